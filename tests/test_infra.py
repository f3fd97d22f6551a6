"""Run infrastructure: provenance, the wide metrics.csv logger, W&B mode and lifecycle, run folders."""

from __future__ import annotations

import errno
import math
import re
import subprocess
import sys
import time
from datetime import datetime

import pytest

from groundthink.training import host_memory, rundir, wandb_setup
from groundthink.training.metrics_file import read_metrics_csv
from groundthink.training.metrics_logger import CSVMetricsLogger
from groundthink.training.provenance import collect_provenance
from groundthink.training.rundir import RunDirError, ensure_writable, new_run_id

PROVENANCE_KEYS = {
    "git_sha",
    "git_branch",
    "git_dirty",
    "python",
    "torch",
    "cuda",
    "gpu_name",
    "lightning",
    "hydra",
    "wandb",
    "hostname",
    "platform",
    "command",
    "timestamp_utc",
}


def test_provenance_in_a_git_repository_is_complete_and_fast(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q", "-b", "trunk"], check=True)
    (repo / "a.txt").write_text("one\n")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    (repo / "outputs").mkdir()
    (repo / "outputs" / "metrics.csv").write_text("step\n")  # untracked outputs do not make the tree dirty

    t0 = time.perf_counter()
    p = collect_provenance(repo)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.3, f"collect_provenance took {elapsed:.3f} s"
    assert PROVENANCE_KEYS <= set(p)
    assert (
        re.fullmatch(r"[0-9a-f]{40}", p["git_sha"]) and p["git_branch"] == "trunk" and p["git_dirty"] is False
    )
    assert p["git_diff_sha256"] is None
    assert p["python"] == ".".join(map(str, sys.version_info[:3]))
    assert p["torch"] and p["lightning"] and p["hydra"] and p["wandb"]
    assert datetime.fromisoformat(p["timestamp_utc"]).utcoffset().total_seconds() == 0

    (repo / "a.txt").write_text("two\n")
    dirty = collect_provenance(repo)
    assert dirty["git_dirty"] is True and re.fullmatch(r"[0-9a-f]{64}", dirty["git_diff_sha256"])


def test_provenance_outside_git_has_null_git_fields(tmp_path):
    p = collect_provenance(tmp_path)
    assert PROVENANCE_KEYS <= set(p)
    assert p["git_sha"] is None and p["git_branch"] is None and p["git_dirty"] is None
    assert p["hostname"] and p["python"]


def _log_run(logger: CSVMetricsLogger, steps) -> None:
    for step in steps:
        logger.log_metrics({"train/loss": 5.0 / step}, step=step)
        if step % 2 == 0:
            logger.log_metrics({"val/loss": 6.0 / step, "val/bpb": 1.5}, step=step)
        if step >= 5:
            logger.log_metrics({"perf/tokens_per_s": 1000 + step}, step=step)


def test_metrics_csv_is_wide_grows_columns_and_writes_rows_once_complete(tmp_path):
    logger = CSVMetricsLogger(tmp_path)
    logger.log_metrics({"train/loss": 2.5}, step=1)
    assert not (tmp_path / "metrics.csv").exists()  # step 1 may still get metrics: not written yet
    logger.log_metrics({"train/loss": 2.25}, step=2)
    assert (tmp_path / "metrics.csv").read_text() == "step,train/loss\n1,2.5\n"  # step 1 is complete
    logger.log_metrics({"val/loss": 2.75}, step=2)  # same step: merged into one row, new column
    logger.log_metrics({"train/loss": float("nan"), "lr": 3}, step=3)
    logger.finalize("success")
    assert (tmp_path / "metrics.csv").read_text() == (
        "step,train/loss,val/loss,lr\n1,2.5,,\n2,2.25,2.75,\n3,nan,,3\n"
    )
    series = read_metrics_csv(tmp_path / "metrics.csv")
    assert series["train/loss"][:2] == [(1, 2.5), (2, 2.25)] and math.isnan(series["train/loss"][2][1])
    assert series["val/loss"] == [(2, 2.75)] and series["lr"] == [(3, 3.0)]


def test_metrics_csv_flush_then_late_values_and_appends_match_a_full_rewrite(tmp_path):
    incremental = CSVMetricsLogger(tmp_path / "a")
    _log_run(incremental, range(1, 12))
    incremental.flush()  # as before a checkpoint: the newest row too
    incremental.log_metrics({"late": 1.0}, step=4)  # an older row gets a new value -> atomic full rewrite
    incremental.finalize("success")
    rewritten = CSVMetricsLogger(tmp_path / "b")
    _log_run(rewritten, range(1, 12))
    rewritten.log_metrics({"late": 1.0}, step=4)
    rewritten._rewrite(len(rewritten.rows))  # the whole table in one atomic rewrite
    text = (tmp_path / "a" / "metrics.csv").read_text()
    assert text == (tmp_path / "b" / "metrics.csv").read_text()
    assert text.splitlines()[0] == "step,train/loss,val/loss,val/bpb,perf/tokens_per_s,late"
    assert len(text.splitlines()) == 12


def test_metrics_csv_resume_equals_uninterrupted_run(tmp_path):
    full = CSVMetricsLogger(tmp_path / "full")
    _log_run(full, range(1, 11))
    full.finalize("success")

    crashed = CSVMetricsLogger(tmp_path / "resumed")
    _log_run(crashed, range(1, 8))  # steps 5..7 happen after the checkpoint at step 4, then the run dies
    crashed.finalize("failed")
    resumed = CSVMetricsLogger(tmp_path / "resumed", resume_step=4)
    after_truncation = read_metrics_csv(tmp_path / "resumed" / "metrics.csv")
    assert max(s for series in after_truncation.values() for s, _ in series) == 4
    assert "perf/tokens_per_s" not in after_truncation  # a column only later rows used is dropped too
    _log_run(resumed, range(5, 11))
    resumed.finalize("success")
    assert (tmp_path / "resumed" / "metrics.csv").read_bytes() == (
        tmp_path / "full" / "metrics.csv"
    ).read_bytes()


def test_a_failing_write_keeps_every_row_already_on_disk(tmp_path, monkeypatch):
    """A full disk (or any write error) mid-run: the rows on disk stay intact, the rest are kept in memory and
    written at the next flush that succeeds; a line cut off mid-write is ignored by the reader."""
    logger = CSVMetricsLogger(tmp_path)
    _log_run(logger, range(1, 6))
    logger.flush()
    before = (tmp_path / "metrics.csv").read_text()
    real_open = open

    def failing_open(path, mode="r", *args, **kwargs):
        if "metrics.csv" in str(path) and ("a" in mode or "w" in mode):
            f = real_open(path, mode, *args, **kwargs)
            f.write(b"6,1.2" if "b" in mode else "6,1.2")  # a torn, partial line, then the disk is full
            f.close()
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    _log_run(logger, range(6, 9))
    logger.flush()
    monkeypatch.undo()
    torn = (tmp_path / "metrics.csv").read_text()
    assert torn.startswith(before)
    assert [s for s, _ in read_metrics_csv(tmp_path / "metrics.csv")["train/loss"]] == [1, 2, 3, 4, 5]
    logger.finalize("success")  # the disk has room again: everything is written, the torn line replaced
    assert [s for s, _ in read_metrics_csv(tmp_path / "metrics.csv")["train/loss"]] == list(range(1, 9))


def test_metrics_reader_rejects_foreign_csv(tmp_path):
    (tmp_path / "x.csv").write_text("time,loss\n1,2\n")
    with pytest.raises(ValueError, match="first column must be 'step'"):
        read_metrics_csv(tmp_path / "x.csv")


@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
    for var in (
        "WANDB_API_KEY",
        "WANDB_IDENTITY_TOKEN_FILE",
        "WANDB_MODE",
        "WANDB_DISABLED",
        "WANDB_BASE_URL",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    for var, sub in (
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
    ):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))

    def network_forbidden(*args, **kwargs):
        raise AssertionError("the network must not be probed without credentials")

    monkeypatch.setattr(wandb_setup, "host_reachable", network_forbidden)
    return tmp_path


def test_wandb_mode_without_credentials_is_offline(no_wandb_credentials, monkeypatch):
    assert wandb_setup.has_credentials() is False
    assert wandb_setup.wandb_mode("auto") == "offline"
    assert wandb_setup.wandb_mode(None) == "offline"
    assert wandb_setup.wandb_mode("online") == "offline"  # asked for, but it could only prompt or fail
    assert wandb_setup.wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_setup.wandb_mode("auto") == "disabled"
    assert wandb_setup.wandb_mode("offline") == "offline"  # the config value wins over the environment
    with pytest.raises(ValueError, match="allowed: auto, online, offline, disabled"):
        wandb_setup.wandb_mode("sometimes")


def test_wandb_mode_with_credentials_depends_on_reachability(no_wandb_credentials, monkeypatch):
    home = no_wandb_credentials / "home"
    home.mkdir()
    (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert wandb_setup.has_credentials() is True
    monkeypatch.setattr(wandb_setup, "host_reachable", lambda *a, **k: False)
    assert wandb_setup.wandb_mode("auto") == "offline"
    monkeypatch.setattr(wandb_setup, "host_reachable", lambda *a, **k: True)
    assert wandb_setup.wandb_mode("auto") == "online"
    assert wandb_setup.wandb_mode("offline") == "offline"


def test_host_probe_is_bounded_and_cached(monkeypatch):
    calls = []

    def slow_connect(address, timeout):
        calls.append(address)
        time.sleep(3)
        raise OSError("unreachable")

    monkeypatch.setattr(wandb_setup.socket, "create_connection", slow_connect)
    monkeypatch.setattr(wandb_setup, "_reachable_cache", {})
    t0 = time.perf_counter()
    assert wandb_setup.host_reachable("https://wandb.invalid", timeout_s=0.2) is False
    assert wandb_setup.host_reachable("https://wandb.invalid", timeout_s=0.2) is False
    assert time.perf_counter() - t0 < 1.0 and calls == [("wandb.invalid", 443)]


def test_offline_wandb_logger_writes_into_run_dir_resumes_same_id_and_finishes(no_wandb_credentials):
    import wandb

    run_dir = no_wandb_credentials / "run"
    kwargs = dict(
        project="groundthink-test",
        name="t-abcd1234",
        group="g",
        tags=["a", "model.alpha=0.5"],
        job_type="test",
        config={"lr": 0.1},
        run_id="abcd1234",
        mode="offline",
    )
    logger = wandb_setup.make_wandb_logger(run_dir, **kwargs)
    logger.log_metrics({"train/loss": 1.0}, step=1)
    assert logger.experiment.id == "abcd1234"
    assert "WANDB_MODE" not in __import__("os").environ  # no process-wide leak into the next multirun job
    wandb_setup.finish_wandb(status_ok=True)
    assert wandb.run is None
    files = list((run_dir / "wandb").glob("offline-run-*-abcd1234/run-abcd1234.wandb"))
    assert len(files) == 1

    again = wandb_setup.make_wandb_logger(run_dir, **kwargs)
    assert again.experiment.id == "abcd1234"
    wandb_setup.finish_wandb(status_ok=False)
    assert wandb.run is None
    wandb_setup.finish_wandb(status_ok=True)  # nothing open: still safe


def test_run_ids_are_unique_hex():
    ids = [new_run_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{8}", i) for i in ids)


def test_ensure_writable_creates_and_checks(tmp_path):
    target = tmp_path / "new" / "outputs"
    assert ensure_writable(target) == target and target.is_dir()
    assert list(target.iterdir()) == []  # the probe file is gone


def test_ensure_writable_read_only_names_the_path(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(rundir.tempfile, "mkstemp", read_only)
    with pytest.raises(RunDirError) as err:
        ensure_writable(tmp_path / "outputs")
    msg = str(err.value)
    assert str(tmp_path / "outputs") in msg and "read-only" in msg and "paths.output_root=" in msg


def test_ensure_writable_full_disk_names_the_path(tmp_path, monkeypatch):
    class Usage:
        total, used, free = 10 * 2**30, 10 * 2**30 - 2**20, 2**20

    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(RunDirError) as err:
        ensure_writable(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "1.0 MiB free" in msg and "paths.output_root=" in msg


def test_ensure_writable_rejects_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="not a folder"):
        ensure_writable(tmp_path / "f")


@pytest.mark.parametrize("tied", [False, True])
def test_mfu_counts_every_parameter_but_the_embedding_lookup(tied):
    """MFU = tokens/s x 6 x (parameters that cost FLOPs per token) / peak. The embedding table is a lookup and is left
    out; tied to the head it is the head's matrix and counts once. (count_flops_params once looked for
    `model.embedding`, which does not exist, and so never left the table out: MFU was overstated.)"""
    from groundthink.models import HybridLM
    from groundthink.training.callbacks import Throughput, count_flops_params

    from .conftest import tiny_config

    model = HybridLM(tiny_config(vocab_size=300, tie_embeddings=tied))
    total = sum(p.numel() for p in model.parameters())
    table = model.embed.weight.numel()
    assert table == 300 * 32
    assert count_flops_params(model) == (total if tied else total - table)
    per_token = 6 * count_flops_params(model)
    callback = Throughput(every_n_steps=1, flops_params=count_flops_params(model), peak_flops=1e12, precision="32-true")
    assert callback.flops_per_token == per_token


def test_a_single_runs_clock_starts_with_its_process():
    """Issue 18: "command to first step" counts from the process's start (Python's start-up and every import
    included), read from /proc, not from when the entry point got control."""
    spawned = time.time()
    code = "import groundthink, sys; from groundthink.hydra_support import command_started, process_started; " \
           "print(process_started(), command_started(), groundthink._IMPORTED_AT)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    process, command, imported = map(float, out)
    assert command == pytest.approx(process, abs=0.02)
    assert spawned - 0.05 <= process <= imported  # the clock ticks 10 ms; the process exists before it imports


def test_composing_a_config_does_not_import_the_training_stack():
    """Issue 18: the entry point's module, the schema and the config checks import neither Lightning nor what it
    pulls in (torchmetrics, transformers, scipy): `--cfg job`, `--help` and a mistyped override answer sooner."""
    code = ("import sys, groundthink.train, groundthink.schema, groundthink.cli_checks; "
            "print(sorted(m for m in ('lightning', 'torchmetrics', 'transformers', 'scipy', 'wandb', 'datasets') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


FAULTS_OF_REUSED_MEMORY = """
import ctypes, resource, sys
from groundthink.training.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
MiB = 1 << 20
def step(n, size):  # what a training step does with its activations: allocate, write every page, free
    blocks = [libc.malloc(size) for _ in range(n)]
    for block in blocks:
        libc.memset(block, 1, size)
    for block in blocks:
        libc.free(block)
step(1, 4 * MiB)  # glibc's default: mapped and unmapped, its mmap threshold rises to 4 MiB
step(8, 2 * MiB)  # the heap grows to hold a step
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step(8, 2 * MiB)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not host_memory.running_glibc(), reason="glibc's malloc only")
def test_keeping_freed_memory_removes_the_page_faults_of_reused_memory():
    """Issue 18: with glibc's defaults, the memory a step frees goes back to the kernel (the heap's free top beyond
    twice the mmap threshold is trimmed) and faults in again, zero-filled, when the next step allocates it;
    `trainer.keep_freed_memory` keeps it in the process. Ten steps of 8 x 2 MiB write 40960 pages; each allocator
    setting runs in a fresh process, malloc called directly so that nothing else allocates between the blocks."""
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS_OF_REUSED_MEMORY, mode], capture_output=True, text=True,
                             check=True)
        return int(out.stdout)

    default, kept = faults("default"), faults("keep")
    assert default > 30_000, f"glibc's default kept the freed memory ({default} faults): nothing to compare"
    assert kept < 100, f"{kept} page faults in ten steps with the freed memory kept (default: {default})"


def test_keeping_freed_memory_changes_nothing_off_glibc(monkeypatch):
    def unknown(name):  # what os.confstr does on a C library without the name (macOS, musl)
        raise ValueError(f"unrecognized configuration name {name!r}")

    monkeypatch.setattr(host_memory.os, "confstr", unknown)
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda *a: pytest.fail("the C library was called"))
    assert host_memory.running_glibc() is False
    assert host_memory.keep_freed_memory() is False


@pytest.mark.parametrize("keep", [True, False])
def test_host_settings_follow_the_trainer_group(monkeypatch, keep):
    import torch

    from groundthink.training import assembly
    from groundthink.training.settings import TrainerSettings

    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append("kept") or True)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    assembly.apply_host_settings(TrainerSettings(num_threads=3, keep_freed_memory=keep))
    assert calls == ([3, "kept"] if keep else [3])


@pytest.mark.parametrize("multirun", [False, True])
def test_closing_lines_name_where_the_start_up_is_counted_from(tmp_path, multirun):
    from groundthink.training.run import Outcome, closing_lines

    class Folder:
        path = tmp_path

        def has_checkpoint(self) -> bool:
            return False

    outcome = Outcome("completed", summary={"run_id": "1a2b3c4d", "step": 3, "startup_s": 4.26, "final": {}})
    lines = closing_lines(outcome, Folder(), precision="32-true", wandb_mode="disabled", multirun=multirun)
    assert ("job start to first step 4.3 s" if multirun else "command to first step 4.3 s") in lines



def test_throughput_leaves_out_each_processs_first_step(monkeypatch):
    """The first step carries one-time work (Triton compiling the GPU kernels, torch.compile, first allocations):
    a 60 s first step followed by 1 s steps must not read as a 30x slower run. A process that made one step
    reports that step rather than nothing."""
    from types import SimpleNamespace

    from groundthink.training import callbacks

    clock = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    logged = []
    monkeypatch.setattr(callbacks, "log_metrics", lambda trainer, metrics, step: logged.append((step, metrics)))
    trainer = SimpleNamespace(world_size=1)
    batch = {"input_ids": SimpleNamespace(numel=lambda: 100)}  # 100 tokens a step

    def run(step_seconds):
        cb = callbacks.Throughput(every_n_steps=2, flops_params=10, peak_flops=1e6, precision="32-true")
        for step, seconds in enumerate(step_seconds, start=1):
            module = SimpleNamespace(global_step=step, step_started=step)
            cb.on_train_batch_start(trainer, module, batch, step - 1)
            clock[0] += seconds
            cb.on_train_batch_end(trainer, module, None, batch, step - 1)
        return cb

    cb = run([60.0, 1.0, 1.0, 2.0, 1.0])
    assert cb.tokens_per_s == pytest.approx(400 / 5.0) and cb.first_step == (100, 60.0)
    # windows: step 2 holds step 2 alone (step 1 is left out), step 4 holds steps 3-4
    assert [(s, round(m["perf/tokens_per_s"], 6)) for s, m in logged] == [(2, 100.0), (4, round(200 / 3.0, 6))]
    assert logged[0][1]["perf/mfu"] == pytest.approx(100.0 * 60 / 1e6)
    assert run([4.0]).tokens_per_s == pytest.approx(25.0)  # one step: that step
