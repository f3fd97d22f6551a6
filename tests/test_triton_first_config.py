"""benchmarks/triton_first_config.py, gpu_check.sh's parity-stage plugin: the configurations an autotuner is handed
end after the first one that works. (Checked against Triton's own Autotuner, run by its interpreter, by hand: see
the module; the test environment has no triton.)"""

from __future__ import annotations

import sys

from benchmarks.triton_first_config import FirstWorking, install, main


class Owner:
    last_timing = None


def bench_loop(configs, owner, timings):
    """What Autotuner.run does with the pruned configurations: time each one it is given, keep the fastest."""
    measured = {}
    for config in configs:
        owner.last_timing = timings[config]
        measured[config] = timings[config]
    return measured


def test_only_the_first_configuration_that_works_is_timed():
    owner, inf = Owner(), float("inf")
    configs = FirstWorking(["a", "b", "c", "d"], owner)
    assert bench_loop(configs, owner, {"a": [2.0], "b": [1.0], "c": [0.5], "d": [0.1]}) == {"a": [2.0]}
    # one that does not fit (the autotuner's inf) is passed over, as the autotuner passes over it
    assert bench_loop(configs, owner, {"a": [inf], "b": [inf], "c": [3.0], "d": [0.1]}) == {
        "a": [inf], "b": [inf], "c": [3.0]}
    # none works: all are tried, and the autotuner reports it as it would have
    assert list(bench_loop(configs, owner, dict.fromkeys("abcd", [inf]))) == ["a", "b", "c", "d"]


def test_iterating_without_timing_sees_every_configuration_and_starts_again_each_time():
    owner = Owner()
    configs = FirstWorking(["a", "b", "c"], owner)
    assert [str(c) for c in configs] == ["a", "b", "c"]  # e.g. the autotuner's cache key
    assert len(configs) == 3 and list(configs) == ["a", "b", "c"]


def test_without_triton_it_installs_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.runtime", None)
    assert install() is False


def test_the_runner_runs_the_module_as_python_m_would(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.runtime", None)
    (tmp_path / "gt_runner_probe.py").write_text("import sys\nprint(__name__, sys.argv[1:])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert main(["gt_runner_probe", "model=8m", "--x"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "__main__ ['model=8m', '--x']"  # run as a script, with its own arguments
    assert "triton is not installed, nothing to patch" in err
    assert main([]) == 2 and "usage:" in capsys.readouterr().err
    assert main(["groundthink.trian"]) == 2 and "no module named 'groundthink.trian'" in capsys.readouterr().err
    assert main(["nosuchpackage.train"]) == 2 and "no module named" in capsys.readouterr().err
