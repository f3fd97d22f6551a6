"""Build mamba-ssm or causal-conv1d from its source archive for one GPU architecture (`gpu_check.sh --wheels`).

Both packages publish only source archives on PyPI. Their setup.py first downloads a prebuilt wheel from GitHub;
on a machine that cannot reach GitHub it compiles its CUDA extension for every architecture it lists (sm_75 to
sm_121 with CUDA 13: nine), which takes far longer than the GPU check has. This unpacks the archive, keeps the
`-gencode` pair of the GPU that is present and drops the others, and installs the result with pip, without build
isolation (the build needs the torch already installed) and without dependencies (installed separately).

    python -m benchmarks.kernel_sdist ARCHIVE.tar.gz --arch 90 [--log FILE]

`--arch` is the compute capability without its dot (an H100/H200 is 90). The build's own output goes to the log
file (nvcc prints ptxas statistics for every kernel); its last lines are printed when it fails.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# setup.py's own switches: build here rather than download, and never skip the CUDA part.
FORCE_BUILD = {"mamba_ssm": "MAMBA_FORCE_BUILD", "causal_conv1d": "CAUSAL_CONV1D_FORCE_BUILD"}
_GENCODE = re.compile(
    r'^(?P<indent>[ \t]*)cc_flag\.append\("-gencode"\)\n[ \t]*cc_flag\.append\("arch=compute_(?P<arch>\d+),'
    r'code=sm_\d+"\)\n',
    re.MULTILINE,
)


def keep_one_arch(setup_py: str, arch: str) -> str:
    """setup.py's text with every `-gencode arch=compute_X,code=sm_X` pair but `arch`'s replaced by `pass`."""
    listed = [m["arch"] for m in _GENCODE.finditer(setup_py)]
    if not listed:
        raise ValueError("found no cc_flag.append(\"-gencode\") pairs in setup.py: its layout changed; build it as "
                         "pip would (all architectures) or use a prebuilt wheel")
    if arch not in listed:
        raise ValueError(f"setup.py builds for sm_{', sm_'.join(listed)}, not for this GPU's sm_{arch}")
    # `pass` keeps an `if cuda_version >= ...:` block whose only appends were removed a valid block.
    return _GENCODE.sub(lambda m: m[0] if m["arch"] == arch else f"{m['indent']}pass\n", setup_py)


def build(archive: Path, arch: str, log: Path, python: str = sys.executable) -> float:
    """Unpack, restrict to `arch`, pip-install; returns the seconds it took. Raises with the log's tail on failure."""
    package = next((name for name in FORCE_BUILD if archive.name.startswith(name + "-")), None)
    if package is None:
        raise ValueError(f"{archive.name}: expected a mamba_ssm-*.tar.gz or causal_conv1d-*.tar.gz source archive")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"build-{package}-") as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        (source,) = [p for p in Path(tmp).iterdir() if p.is_dir()]
        setup = source / "setup.py"
        setup.write_text(keep_one_arch(setup.read_text(), arch))
        env = {**os.environ, FORCE_BUILD[package]: "TRUE", "TORCH_CUDA_ARCH_LIST": f"{arch[:-1]}.{arch[-1]}",
               "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count()))}
        cmd = [python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "--no-cache-dir",
               str(source)]
        with open(log, "w") as out:
            rc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"building {archive.name} for sm_{arch} failed (pip exit {rc}); "
                           f"last lines of {log}:\n{tail}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archive", type=Path)
    parser.add_argument("--arch", required=True, help="compute capability without the dot, e.g. 90")
    parser.add_argument("--log", type=Path, default=None, help="where the build output goes (default: a temp file)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter to install into")
    args = parser.parse_args(argv)
    if not args.arch.isdigit():
        parser.error(f"--arch must be digits such as 90, got {args.arch!r}")
    log = args.log or Path(tempfile.mkstemp(prefix="kernel-build-", suffix=".log")[1])
    try:
        seconds = build(args.archive, args.arch, log, args.python)
    except (ValueError, RuntimeError, OSError, tarfile.TarError) as err:
        print(f"kernel_sdist: {err}", file=sys.stderr)
        return 1
    print(f"kernel_sdist: built and installed {args.archive.name} for sm_{args.arch} in {seconds:.0f} s (log: {log})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
