"""benchmarks/kernel_sdist.py: building mamba-ssm / causal-conv1d for the one GPU architecture present."""

from __future__ import annotations

import ast
import io
import tarfile

import pytest

from benchmarks.kernel_sdist import keep_one_arch, main

# The shape both packages' setup.py has (written here, not copied): -gencode pairs, some under version checks.
SETUP = '''
cc_flag = []
if building:
    cc_flag.append("-gencode")
    cc_flag.append("arch=compute_80,code=sm_80")
    if cuda >= (11, 8):
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_90,code=sm_90")
    if cuda >= (12, 8):
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_100,code=sm_100")
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_120,code=sm_120")
flags = ["-O3"] + cc_flag
'''


def gencode(text: str, building=True, cuda=(13, 0)) -> list[str]:
    scope = {"building": building, "cuda": cuda}
    exec(compile(text, "setup.py", "exec"), scope)
    return scope["cc_flag"]


def test_only_the_chosen_architecture_is_compiled_and_the_file_stays_valid_python():
    assert gencode(SETUP) == ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
                              "-gencode", "arch=compute_100,code=sm_100", "-gencode", "arch=compute_120,code=sm_120"]
    for arch in ("80", "90", "100", "120"):
        patched = keep_one_arch(SETUP, arch)
        ast.parse(patched)  # an `if` whose appends were all removed keeps a body (`pass`)
        assert gencode(patched) == ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    assert "flags = [\"-O3\"] + cc_flag" in keep_one_arch(SETUP, "90")


@pytest.mark.parametrize("text,arch,message", [
    (SETUP, "89", "builds for sm_80, sm_90, sm_100, sm_120, not for this GPU's sm_89"),
    ("cc_flag = ['-arch=native']\n", "90", "found no cc_flag.append(\"-gencode\") pairs"),
])
def test_an_architecture_or_layout_it_cannot_handle_is_an_error_that_says_so(text, arch, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        keep_one_arch(text, arch)


def source_archive(folder, name: str):
    """folder/name.tar.gz holding name/setup.py (SETUP), as a package's source archive does."""
    archive = folder / f"{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(f"{name}/setup.py")
        info.size = len(SETUP)
        tar.addfile(info, io.BytesIO(SETUP.encode()))
    return archive


def test_the_command_line_names_a_wrong_archive_or_arch(tmp_path, capsys):
    other = source_archive(tmp_path, "numpy-2.0")
    assert main([str(other), "--arch", "90"]) == 1
    assert "expected a mamba_ssm-*.tar.gz or causal_conv1d-*.tar.gz" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([str(other), "--arch", "9.0"])
    assert exc.value.code == 2 and "--arch must be digits such as 90" in capsys.readouterr().err


def test_an_archive_whose_setup_builds_other_gpus_fails_before_anything_is_installed(tmp_path, capsys):
    archive = source_archive(tmp_path, "mamba_ssm-9.9")
    assert main([str(archive), "--arch", "75", "--python", "/nonexistent/python"]) == 1
    assert "not for this GPU's sm_75" in capsys.readouterr().err
