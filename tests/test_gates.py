"""Gates G0-G5: each passes on a healthy model or run and fails on a deliberately broken one; gates.json, the
exit code, the `groundthink-gate` command line, and one gate multirun through the real training CLI."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from groundthink import schema
from groundthink.data.tokenizer import CONTROL_TOKENS, Tokenizer, build_tokenizer, check_control_tokens
from groundthink.gates import cli
from groundthink.gates.cli import gate_config
from groundthink.gates.runner import check_gate_config, evaluate_gate, finish_gate_run
from groundthink.hydra_support import register_resolvers
from groundthink.models import HybridLM
from groundthink.models.presets import PRESETS, preset
from groundthink.reporting.runs import load_run
from tests.conftest import REPO, run_train, sample_texts, train_in_process
from tests.test_diagnostics import freeze_states

GATE_NAMES = sorted(p.stem for p in (REPO / "conf" / "gate").glob("*.yaml"))


def judged(name: str) -> dict:
    """The gate's config from conf/gate/, judged whatever the run's length (these runs train 20-40 steps; the
    SMOKE verdict for short runs has its own test)."""
    return {**gate_config(name), "min_steps": None}


# The tiny runs' own diagnostic alerts (gradient band, ratio, frozen layer) are expected here, not under test.
pytestmark = pytest.mark.filterwarnings("ignore::groundthink.training.diagnostics.DiagnosticWarning")


def verdict(report) -> tuple[str, set[str], set[str]]:
    return report.verdict, set(report.failed), set(report.warnings)


# ----- runs shared by the tests (tiny model, 40 steps, in process) ---------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {
        "healthy": train_in_process(root / "healthy"),
        "mamba": train_in_process(root / "mamba", pattern="M"),
        "mamba_seed1": train_in_process(root / "mamba_seed1", pattern="M", seed=1),
        "exploding": train_in_process(root / "exploding", lr=1.0),
        "frozen": train_in_process(root / "frozen", model=freeze_states(HybridLM(preset("tiny")))),
        "nan": train_in_process(root / "nan", nan_at_step=12),
    }


# ----- G0 ------------------------------------------------------------------------------------------------------
class SplittingTokenizer(Tokenizer):
    """Deliberately broken: its encoder spells <|user|> out in bytes instead of using the control id."""

    def __init__(self) -> None:
        super().__init__("char")

    def encode(self, text: str) -> list[int]:
        if "<|user|>" in text:
            return (np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + len(CONTROL_TOKENS)).tolist()
        return super().encode(text)


def test_g0_passes_char_and_bpe_and_fails_a_tokenizer_that_splits_a_control_token():
    for tok in (build_tokenizer("char"), build_tokenizer("bpe", sample_texts(), 600)):
        report = evaluate_gate(gate_config("g0"), tokenizer=tok)
        assert verdict(report) == ("PASS", set(), set()), tok
        assert len(report.criteria) == 2 * len(CONTROL_TOKENS)
    broken = SplittingTokenizer()
    report = evaluate_gate(gate_config("g0"), tokenizer=broken)
    assert verdict(report) == ("FAIL", {"control_token/<|user|>/alone", "control_token/<|user|>/in_text"}, set())
    alone = next(c for c in report.criteria if c.name == "control_token/<|user|>/alone")
    assert alone.value == len("<|user|>") and "its id is 4" in alone.evidence
    assert [t for t, _ in check_control_tokens(broken)] == ["<|user|>"]  # the data layer's rule agrees


# ----- G1 ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["H", "A"])
def test_g1_passes_healthy_variants(pattern):
    torch.manual_seed(0)
    model = HybridLM(preset("tiny", pattern=pattern))
    report = evaluate_gate(gate_config("g1"), model=model)
    assert verdict(report) == ("PASS", set(), set())
    names = {c.name for c in report.criteria}
    assert names == {"forward_runs", "shapes", "finite_outputs", "finite_gradients", "carried_state_continues"}
    assert all(p.grad is None for p in model.parameters())  # the check leaves no gradient behind


def test_g1_fails_a_model_with_a_nan_parameter_and_names_its_component():
    torch.manual_seed(0)
    model = HybridLM(preset("tiny"))
    with torch.no_grad():
        model.blocks[1].mamba.out_proj.weight[0, 0] = float("nan")
    report = evaluate_gate(gate_config("g1"), model=model)
    assert report.verdict == "FAIL"
    assert {"finite_outputs", "finite_gradients", "carried_state_continues"} <= set(report.failed)
    finite = next(c for c in report.criteria if c.name == "finite_outputs")
    assert "blocks.1.mamba.out_proj" in finite.evidence and "(mamba)" in finite.evidence


def test_g1_fails_a_model_whose_carried_state_does_not_continue():
    torch.manual_seed(0)
    report = evaluate_gate(gate_config("g1"), model=freeze_states(HybridLM(preset("tiny"))))
    assert verdict(report) == ("FAIL", {"carried_state_continues"}, set())


# ----- G2 ------------------------------------------------------------------------------------------------------
def test_g2_in_band_passes_out_of_band_warns_and_a_zero_state_fails():
    tok = build_tokenizer("char")
    torch.manual_seed(0)
    rwkv = evaluate_gate(gate_config("g2"), model=HybridLM(preset("tiny", pattern="R")), tokenizer=tok)
    assert verdict(rwkv) == ("PASS", set(), set())
    entropy = next(c for c in rwkv.criteria if c.name == "state_entropy")
    assert 2.0 <= entropy.value <= math.log(32)  # heads of 32 x 32: at most ln 32
    torch.manual_seed(0)
    mamba = HybridLM(preset("tiny", pattern="M"))
    report = evaluate_gate(gate_config("g2"), model=mamba, tokenizer=tok)
    assert verdict(report) == ("PASS", set(), {"state_entropy"})  # [32 x 16] heads: below the 2.0 band
    strict = {**gate_config("g2"), "warning_criteria": []}
    assert verdict(evaluate_gate(strict, model=mamba, tokenizer=tok)) == ("FAIL", {"state_entropy"}, set())
    frozen = evaluate_gate(gate_config("g2"), model=freeze_states(HybridLM(preset("tiny"))), tokenizer=tok)
    assert frozen.verdict == "FAIL"
    assert set(frozen.failed) == {f"state_nonzero/L{i}/{b}" for i in (0, 1) for b in ("rwkv", "mamba")}
    assert frozen.warnings == ["state_entropy"]  # no value at all: reported, the required criteria fail the gate


# ----- G3 ------------------------------------------------------------------------------------------------------
def test_g3_passes_a_healthy_run_and_fails_exploding_gradients_and_a_nan(runs):
    healthy = evaluate_gate(judged("g3"), runs["healthy"].run_dir)
    assert verdict(healthy) == ("PASS", set(), set())
    grad = next(c for c in healthy.criteria if c.name == "grad_norm_mean")
    assert "steps 20-40" in grad.evidence
    exploding = evaluate_gate(judged("g3"), runs["exploding"].run_dir)
    assert verdict(exploding) == ("FAIL", {"grad_norm_mean"}, set())
    assert next(c for c in exploding.criteria if c.name == "grad_norm_mean").value > 5
    nan = evaluate_gate(judged("g3"), runs["nan"].run_dir)
    assert "run_completed" in nan.failed
    assert "step 12" in next(c for c in nan.criteria if c.name == "run_completed").evidence


# ----- G3.5 ----------------------------------------------------------------------------------------------------
def test_g3_5_passes_a_healthy_state_and_fails_a_frozen_one(runs):
    healthy = evaluate_gate(judged("g3_5"), runs["mamba"].run_dir)
    assert verdict(healthy) == ("PASS", set(), set())
    frozen = evaluate_gate(judged("g3_5"), runs["frozen"].run_dir)
    assert verdict(frozen) == ("FAIL", {"state_cosine", "state_svd_top5_energy"}, set())
    cos = next(c for c in frozen.criteria if c.name == "state_cosine")
    assert cos.value == pytest.approx(1.0) and "worst layer L" in cos.evidence and "steps 20-40" in cos.evidence


def test_g3_5_fails_saturated_decays(tmp_path):
    # The identity init puts many RWKV decays above 0.999 (long memory from the start): saturated gates.
    run = train_in_process(tmp_path / "identity", init="identity", steps=20)
    report = evaluate_gate(judged("g3_5"), run.run_dir)
    assert "gate_saturation" in report.failed
    assert next(c for c in report.criteria if c.name == "gate_saturation").value > 0.3


# ----- G3.6 ----------------------------------------------------------------------------------------------------
def _g36(baseline: Path) -> dict:
    return {**judged("g3_6"), "baseline_run": str(baseline)}


def test_g3_6_passes_against_a_matching_baseline_and_fails_divergence_and_imbalance(runs, tmp_path):
    base = runs["mamba"].run_dir
    ok = evaluate_gate(_g36(base), runs["mamba_seed1"].run_dir)
    assert verdict(ok) == ("PASS", set(), {"same_split_seed"})
    ratio = next(c for c in ok.criteria if c.name == "val_loss_within_baseline")
    assert 0.8 < ratio.value < 1.2 and "step 40" in ratio.evidence
    diverged = evaluate_gate(_g36(base), runs["exploding"].run_dir)
    assert "val_loss_within_baseline" in diverged.failed and diverged.verdict == "FAIL"
    # The healthy hybrid's RWKV branch gets ~20x less gradient than its Mamba branch over these 40 steps.
    imbalanced = evaluate_gate(_g36(runs["healthy"].run_dir), runs["healthy"].run_dir)
    assert "grad_ratio_rwkv_mamba" in imbalanced.failed
    other_data = tmp_path / "other_data"
    shutil.copytree(base, other_data)
    config = (other_data / "config.yaml").read_text().replace("source: embedded", "source: file")
    (other_data / "config.yaml").write_text(config)
    assert "same_data" in evaluate_gate(_g36(other_data), runs["mamba_seed1"].run_dir).failed


# ----- G4 ------------------------------------------------------------------------------------------------------
def test_g4_evaluation_runs_and_logs_and_fails_on_nan_or_crash(runs, tmp_path):
    run = runs["healthy"]
    run_dir = tmp_path / "g4"
    shutil.copytree(run.run_dir, run_dir)
    report = evaluate_gate(gate_config("g4"), run_dir, model=run.model, tokenizer=run.tokenizer,
                           val_texts=run.val_texts, summary=run.summary)
    assert report.verdict == "PASS" and not report.failed
    metrics = json.loads((run_dir / "eval.json").read_text())["metrics"]
    assert 1 < metrics["eval/ppl_carried"] < 264 and metrics["eval/bpb_reset"] > 0
    assert "eval/ppl_reset" in (run_dir / "metrics.csv").read_text().splitlines()[0]
    nan = runs["nan"]
    nan_dir = tmp_path / "g4_nan"
    shutil.copytree(nan.run_dir, nan_dir)
    broken = evaluate_gate(gate_config("g4"), nan_dir, model=nan.model, tokenizer=nan.tokenizer,
                           val_texts=nan.val_texts, summary=nan.summary)
    assert {"finite/eval/ppl_carried", "finite/eval/bpb_reset"} <= set(broken.failed)
    crash = evaluate_gate(gate_config("g4"), run_dir, model=run.model, tokenizer=run.tokenizer, val_texts=[])
    assert verdict(crash) == ("FAIL", {"evaluation_runs"}, set())
    assert "no held-out texts" in crash.criteria[0].value


# ----- G5 ------------------------------------------------------------------------------------------------------
def test_g5_passes_below_the_target_warns_when_uninformative_and_fails_a_nan_run(runs):
    healthy = runs["healthy"]
    report = evaluate_gate(judged("g5"), healthy.run_dir, tokenizer=healthy.tokenizer)
    assert verdict(report) == ("PASS", set(), {"threshold_informative"})  # ln 264 = 5.58 < 6.5
    strict = {**judged("g5"), "thresholds": {"max_val_loss": 2.0}}
    assert verdict(evaluate_gate(strict, healthy.run_dir)) == ("FAIL", {"val_loss_below"}, set())
    assert "run_completed" in evaluate_gate(judged("g5"), runs["nan"].run_dir).failed


# ----- gates.json, exit codes, reporting -----------------------------------------------------------------------
def test_finish_gate_run_writes_gates_json_read_by_the_compare_report(runs, tmp_path):
    run_dir = tmp_path / "exploding"
    shutil.copytree(runs["exploding"].run_dir, run_dir)
    assert finish_gate_run(judged("g3"), run_dir) == 1
    assert finish_gate_run({**judged("g3"), "fail_exit": False}, run_dir) == 0
    data = json.loads((run_dir / "gates.json").read_text())
    assert data["gate"] == "G3" and data["verdict"] == "FAIL" and data["failed"] == ["grad_norm_mean"]
    for c in data["criteria"]:
        assert set(c) == {"name", "value", "threshold", "rule", "passed", "severity", "evidence"}
    loaded = load_run(run_dir, tmp_path)
    assert (loaded.gate, loaded.gate_verdict) == ("G3", "FAIL")
    assert finish_gate_run({"name": "G3", "thresholds": {}}, run_dir) == 1  # cannot be evaluated: FAIL
    assert json.loads((run_dir / "gates.json").read_text())["failed"] == ["gate_evaluated"]


def test_gate_config_errors_are_caught_before_training(tmp_path):
    with pytest.raises(ValueError, match="baseline_run"):
        check_gate_config(gate_config("g3_6"))
    with pytest.raises(ValueError, match="no metrics.csv"):
        check_gate_config({**gate_config("g3_6"), "baseline_run": str(tmp_path)})
    with pytest.raises(ValueError, match=r"unknown \['max_coss'\]"):
        check_gate_config({**gate_config("g3_5"), "thresholds": {**gate_config("g3_5")["thresholds"], "max_coss": 1}})
    with pytest.raises(ValueError, match="diagnostics.enabled=true"):
        check_gate_config(gate_config("g3"), {"enabled": False})
    with pytest.raises(ValueError, match="not a gate"):
        check_gate_config({"name": "G9"})


def _compose(overrides: list[str]):
    register_resolvers()
    schema.register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("name", GATE_NAMES)
def test_every_gate_config_composes_with_gate_equals_and_is_valid(name, runs):
    cfg = _compose([f"gate={name}"])
    gate = OmegaConf.to_container(cfg.gate, resolve=True)
    if name == "g3_6":
        gate["baseline_run"] = str(runs["healthy"].run_dir)
    spec = check_gate_config(gate, OmegaConf.to_container(cfg.diagnostics, resolve=True))
    assert spec.name == gate["name"]


def test_plus_gate_is_the_wrong_form_because_gate_is_already_in_the_defaults():
    with pytest.raises(Exception, match="Multiple values for gate"):
        _compose(["+gate=g3"])


# ----- groundthink-gate ----------------------------------------------------------------------------------------
def test_gate_cli_static_names_a_bad_model_preset_or_pattern_without_a_traceback(tmp_path):
    """`groundthink-gate static --model smal` printed a raw ValueError traceback."""
    proc = subprocess.run([sys.executable, "-m", "groundthink.gates.cli", "static", "--gates", "g1", "--model", "smal",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 1, proc.stderr  # as the CLI's other usage errors (SystemExit("error: ..."))
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert proc.stderr.strip().splitlines() == [
        f"error: --model smal: not a model preset; allowed: {', '.join(PRESETS)}"]
    assert not (tmp_path / "gates.json").exists()
    with pytest.raises(SystemExit, match=r"--pattern Q: .*not allowed"):
        cli.main(["static", "--gates", "g1", "--model", "tiny", "--pattern", "Q", "--out", str(tmp_path)])


def test_gate_cli_static_and_check(runs, tmp_path, capsys):
    assert cli.main(["static", "--model", "tiny", "--pattern", "R,A", "--out", str(tmp_path / "static")]) == 0
    data = json.loads((tmp_path / "static" / "gates.json").read_text())
    assert data["verdict"] == "PASS" and data["verdicts"] == {"G0": "PASS", "G1": "PASS", "G2": "PASS"}
    names = {c["name"] for c in data["criteria"]}
    assert "G1/tiny:A/shapes" in names and "G2/tiny:R/state_entropy" in names
    assert not any(n.startswith("G2/tiny:A") for n in names)  # no recurrent state to measure
    with pytest.raises(SystemExit, match="static checks are G0, G1, G2"):
        cli.main(["static", "--gates", "g3"])
    judge = ["--set", "min_steps=null"]  # these runs are shorter than the gates' min_steps
    assert cli.main(["check", str(runs["mamba"].run_dir), "--gate", "g3_5", *judge]) == 0
    assert json.loads((runs["mamba"].run_dir / "gates_g3_5.json").read_text())["verdict"] == "PASS"
    out = tmp_path / "frozen.json"
    assert cli.main(["check", str(runs["frozen"].run_dir), "--gate", "g3_5", "--out", str(out), *judge]) == 1
    assert cli.main(["check", str(runs["frozen"].run_dir), "--gate", "g3_5", "--out", str(out)]) == 0  # SMOKE
    assert json.loads(out.read_text())["verdict"] == "SMOKE"
    assert cli.main(["check", str(runs["mamba_seed1"].run_dir), "--gate", "g3_6", "--baseline",
                     str(runs["mamba"].run_dir), "--set", "thresholds.max_val_loss_ratio=0.5", *judge]) == 1
    assert "val_loss_within_baseline" in capsys.readouterr().out


@pytest.mark.slow
def test_gate_multirun_through_the_training_cli_and_its_matrix(tmp_path):
    proc = run_train(tmp_path, "-m", "gate=g4", "model=tiny", "trainer.max_steps=6", "data.max_documents=60",
                     "logger.wandb.enabled=false", "callbacks.progress_bar=false", "gate.eval.max_batches=2",
                     "faults.nan_at_step=null,3", expect_rc=None)
    assert proc.returncode != 0, proc.stdout[-3000:]  # the second job failed; the sweep still ran both
    (sweep,) = (tmp_path / "outputs" / "default-multirun").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2, proc.stderr[-3000:]
    first, second = (json.loads((job / "gates.json").read_text()) for job in jobs)
    assert first["gate"] == "G4" and first["verdict"] == "PASS", first
    assert (jobs[0] / "eval.json").is_file()
    assert second["verdict"] == "FAIL" and "finite/eval/ppl_carried" in second["failed"]
    assert cli.main(["matrix", str(sweep)]) == 1
    table = (sweep / "gate_matrix.md").read_text()
    assert "faults.nan_at_step=3" in table and "| PASS |" in table and "| FAIL |" in table
    rows = json.loads((sweep / "gate_matrix.json").read_text())
    assert [r["verdict"] for r in rows] == ["PASS", "FAIL"]


@pytest.mark.slow
def test_a_failed_gate_ends_a_completed_training_run_with_exit_code_1(tmp_path):
    proc = run_train(tmp_path, "gate=g5", "model=tiny", "tokenizer=char", "trainer.max_steps=6",
                     "trainer.val_every_n_steps=3", "data.max_documents=60", "logger.wandb.enabled=false",
                     "callbacks.progress_bar=false", "gate.thresholds.max_val_loss=0.5", "gate.min_steps=null",
                     expect_rc=1)
    (run_dir,) = (tmp_path / "outputs" / "default").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    report = json.loads((run_dir / "gates.json").read_text())
    assert report["verdict"] == "FAIL" and report["failed"] == ["val_loss_below"]
    assert "=== gate G5: FAIL ===" in proc.stdout


def test_a_run_shorter_than_the_gate_needs_is_a_smoke_verdict_not_a_failure(runs, tmp_path):
    """Issue 11 item 8: `gate=g3 debug=fast` used to FAIL by design (gradient norm 2.61 after 20 steps)."""
    run_dir = tmp_path / "exploding"
    shutil.copytree(runs["exploding"].run_dir, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert gate_config("g3")["min_steps"] == 1000
    assert finish_gate_run(gate_config("g3"), run_dir, summary=summary) == 0
    report = json.loads((run_dir / "gates.json").read_text())
    assert report["verdict"] == "SMOKE" and "40 of the 1000 steps" in report["smoke"]
    assert report["failed"] == ["grad_norm_mean"]  # computed and shown, not judged
    assert finish_gate_run({**gate_config("g3"), "min_steps": 40}, run_dir, summary=summary) == 1
