"""benchmarks/kernel_interpret.py (`make kernel-interpret`): what it says when its packages are missing or its
arguments are wrong. The check itself needs triton, fla-core and mamba-ssm, which the test environment does not
install (the Makefile target installs them into build/ and runs it)."""

from __future__ import annotations

import importlib.util

import pytest

from benchmarks import kernel_interpret


def test_missing_packages_are_named_with_the_command_that_installs_them(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("triton", "mamba_ssm") else real_find_spec(name, *a))
    assert kernel_interpret.main(["--seq-lens", "15", "--model", "none"]) == 2
    err = capsys.readouterr().err
    assert "needs triton" in err and "mamba-ssm" in err and "make kernel-interpret" in err


@pytest.mark.parametrize("args", [["--seq-lens", "0"], ["--model-seq-len", "-3"]])
def test_a_sequence_length_below_one_is_refused(args, capsys):
    with pytest.raises(SystemExit) as exc:
        kernel_interpret.main(args)
    assert exc.value.code == 2 and "sequence lengths must be positive" in capsys.readouterr().err
