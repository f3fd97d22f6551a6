"""groundthink-eval: the task registry, every task through the real CLI on a short-trained and an untrained
checkpoint, bad inputs, atomic re-runs, and eval columns in groundthink-compare.

The trained run is the session's tiny run (tests/_trained_run.py: 20 steps of the tiny model through the real
CLI, shared with the generation and data-generation tests), copied here so its folder stays untouched; the
untrained checkpoint is a fresh model of the same config written with the project's checkpoint writer into a
copy of that run folder (same config, tokenizer and metrics.csv, step 0).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests._trained_run import trained_tiny_run
from tests.conftest import eval_metrics, run_cli, tiny_config

TASKS = ("lm", "passkey", "mqar", "generation", "persona", "dynamics")
# suite_smoke, smaller still: the point here is that every task runs end to end.
SMALL = ["eval.tasks.lm.max_tokens=256", "eval.tasks.generation.tokens=64", "eval.tasks.mqar.examples=8",
         "eval.tasks.passkey.samples=3", "threads=1", "progress=false"]


def _write_untrained(trained: Path, target: Path) -> Path:
    import torch

    from groundthink.models import HybridLM, ModelConfig
    from groundthink.training.checkpoint import save_checkpoint

    shutil.copytree(trained, target, ignore=shutil.ignore_patterns("checkpoints", "eval", "wandb"))
    meta = json.loads((trained / "checkpoints" / "last.json").read_text())
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.from_dict(meta["config"]["model"]))
    save_checkpoint(target / "checkpoints", "last", {f"model.{k}": v for k, v in model.state_dict().items()},
                    {"run_id": "untrained0", "config": meta["config"], "step": 0})
    return target


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    trained = root / "trained_run"
    shutil.copytree(trained_tiny_run(tmp_path_factory), trained, ignore=shutil.ignore_patterns("eval"))
    untrained = _write_untrained(trained, root / "untrained_run")
    return {"root": root, "trained": trained, "untrained": untrained}


@pytest.fixture(scope="module")
def evaluated(runs) -> dict[str, dict[str, dict]]:
    """suite_smoke on both checkpoints in one multirun of the real CLI."""
    proc = run_cli(runs["root"], "groundthink.evaluate", "-m", f"run={runs['trained']},{runs['untrained']}",
                   "eval=suite_smoke", *SMALL)
    assert "W&B (offline)" in proc.stdout + proc.stderr
    return {name: {task: eval_metrics(runs[name], task) for task in TASKS} for name in ("trained", "untrained")}


@pytest.mark.slow
def test_every_task_runs_on_trained_and_untrained_checkpoints(runs, evaluated):
    for name in ("trained", "untrained"):
        eval_dir = runs[name] / "eval"
        assert sorted(p.name for p in eval_dir.iterdir() if not p.name.startswith(".")) == sorted([*TASKS, "wandb"])
        for task in TASKS:
            assert list((eval_dir / task).glob("*.png")), (name, task)
        assert list((eval_dir / "wandb").glob("offline-run-*")), "an offline W&B run (job_type eval)"
        lm = evaluated[name]["lm"]
        for key in ("ppl_carried", "ppl_reset", "bpb_carried", "bpb_reset", "loss_first_segment"):
            assert math.isfinite(lm[f"eval/lm/{key}"]), (name, key)
        assert 0.0 <= evaluated[name]["passkey"]["eval/passkey/acc_mean"] <= 1.0
        assert 0.0 <= evaluated[name]["persona"]["eval/persona/acc_mean"] <= 1.0
        assert 0.0 <= evaluated[name]["mqar"]["eval/mqar/acc_mean"] <= 1.0
        assert evaluated[name]["generation"]["eval/generation/tokens"] == 64
        assert evaluated[name]["generation"]["eval/generation/tokens_per_s"] > 0
    trained, untrained = evaluated["trained"], evaluated["untrained"]
    # The trained model beats the untrained one where 40 steps can: held-out perplexity and bits per byte.
    assert trained["lm"]["eval/lm/ppl_carried"] < 0.5 * untrained["lm"]["eval/lm/ppl_carried"]
    assert trained["lm"]["eval/lm/bpb_reset"] < untrained["lm"]["eval/lm/bpb_reset"]
    # groundthink.load round trip: the loaded model reproduces the run's final val/loss on its own validation split.
    assert trained["lm"]["eval/lm/val_loss_abs_diff"] <= 1e-6
    assert trained["dynamics"]["eval/dynamics/columns"] >= 2  # val/loss and train/loss at least
    assert trained["lm"]["eval/lm/val_loss_logged"] == pytest.approx(json.loads(
        (runs["trained"] / "summary.json").read_text())["final"]["val/loss"], abs=1e-6)
    print("\ntrained vs untrained:", {t: (trained[t].get(f"eval/{t}/acc_mean"), untrained[t].get(f"eval/{t}/acc_mean"))
                                      for t in ("passkey", "persona", "mqar")},
          "ppl", trained["lm"]["eval/lm/ppl_carried"], untrained["lm"]["eval/lm/ppl_carried"])


@pytest.mark.slow
def test_compare_shows_eval_columns(runs, evaluated, tmp_path):
    from groundthink.reporting.compare import main as compare

    assert compare([str(runs["trained"]), "--out", str(tmp_path / "report"), "--no-plots"]) == 0
    rows = (tmp_path / "report" / "runs.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "eval_lm_ppl_carried" in header and "eval_passkey_acc_mean" in header
    value = float(rows[1].split(",")[header.index("eval_lm_ppl_carried")])
    assert value == pytest.approx(evaluated["trained"]["lm"]["eval/lm/ppl_carried"])
    assert "eval/lm/ppl_carried" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unknown_task", "missing_run", "mqar_vocab", "tampered"])
def test_bad_inputs_fail_with_one_line_and_write_nothing(runs, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(runs["trained"], run, ignore=shutil.ignore_patterns("eval"))
    args = {"unknown_task": [f"run={run}", "eval=no_such_task"],
            "missing_run": [f"run={tmp_path / 'nowhere'}", "eval=lm"],
            "mqar_vocab": [f"run={run}", "eval=mqar", "eval.tasks.mqar.kv_pairs=[200]"],
            "tampered": [f"run={run / 'checkpoints' / 'last.safetensors'}", "eval=lm"]}[case]
    if case == "tampered":
        data = bytearray((run / "checkpoints" / "last.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (run / "checkpoints" / "last.safetensors").write_bytes(bytes(data))
    proc = run_cli(tmp_path, "groundthink.evaluate", *args, expect_rc=1)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    assert "Traceback" not in proc.stderr
    expected = {"unknown_task": "no such task or suite", "missing_run": "no such run folder",
                "mqar_vocab": "too small for kv_pairs=200", "tampered": "last.safetensors"}[case]
    assert expected in lines[0]
    assert not (run / "eval").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ----- in-process, fast ---------------------------------------------------------------------------------------------
def test_suites_compose_in_hydra_as_the_gate_reads_them():
    from hydra import compose, initialize_config_dir

    import groundthink.evaluate as cli
    from groundthink.evaluation.suite import load_suite, task_settings

    cli._register()
    with initialize_config_dir(config_dir=cli.CONF_DIR, version_base="1.3"):
        for suite in ("suite_smoke", "suite_full", "lm"):
            cfg = compose(config_name="evaluate", overrides=["run=x", f"eval={suite}"])
            assert task_settings(cfg.eval.tasks) == task_settings(load_suite(suite)), suite
        cfg = compose(config_name="evaluate", overrides=["run=x", "eval=suite_smoke"])
        assert set(cfg.eval.tasks) == set(TASKS)
        with pytest.raises(Exception, match="max_tokenz"):
            compose(config_name="evaluate", overrides=["run=x", "eval=lm", "eval.tasks.lm.max_tokenz=3"])


def test_task_settings_are_typed():
    from groundthink.evaluation.suite import task_settings
    from groundthink.evaluation.tasks import EvalError

    assert task_settings({"lm": {"max_tokens": 64}})["lm"].max_tokens == 64
    with pytest.raises(EvalError, match="does not exist"):
        task_settings({"nope": {}})
    with pytest.raises(EvalError, match="eval.tasks.lm"):
        task_settings({"lm": {"max_tokens": "many"}})


def test_change_points_find_a_step_and_ignore_noise():
    import random

    from groundthink.evaluation.tasks.dynamics import change_points

    rng = random.Random(0)
    noise = [rng.gauss(0, 0.01) for _ in range(60)]
    assert change_points([2.0 + e for e in noise], penalty=3, min_size=3, max_changes=5) == []
    step = [2.0 + e if i < 25 else 1.0 + e for i, e in enumerate(noise)]
    assert change_points(step, penalty=3, min_size=3, max_changes=5) == [25]


def test_candidate_scores_equal_the_models_summed_log_probabilities():
    import torch

    from groundthink.evaluation.tasks.base import feed, score_candidates
    from groundthink.models import HybridLM

    torch.manual_seed(0)
    model = HybridLM(tiny_config(pattern="H", vocab_size=40)).eval()
    context, candidates = [3, 5, 7, 11, 13, 2, 9], [[4, 8, 1], [6], [30, 31]]
    last, state = feed(model, context, model.init_state(1), chunk=3)
    scores = score_candidates(model, state, last, candidates)
    for cand, score in zip(candidates, scores):
        ids = torch.tensor([context + cand])
        with torch.no_grad():
            logp = model(ids, model.init_state(1))[0][0].float().log_softmax(-1)
        full = sum(float(logp[len(context) - 1 + j, t]) for j, t in enumerate(cand))
        assert score == pytest.approx(full, abs=1e-5)


def test_rerun_replaces_a_tasks_results_atomically(tmp_path):
    from types import SimpleNamespace

    from groundthink.evaluation.suite import run_tasks, task_settings

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step,val/loss\n" + "".join(f"{s},{3.0 if s < 50 else 2.0}\n"
                                                               for s in range(0, 100, 5)))
    loaded = SimpleNamespace(run_dir=run, checkpoint=run / "c.safetensors", checkpoint_sha256="", step=1,
                             run_id="r", config={})
    tasks = task_settings({"dynamics": {}})
    first = run_tasks(loaded, tasks, progress=False, log=lambda _: None)
    (run / "eval" / "dynamics" / "stale.txt").write_text("from the first run")
    second = run_tasks(loaded, tasks, progress=False, log=lambda _: None)
    assert first == second and second["dynamics"]["eval/dynamics/val_loss_first_change_step"] == 50
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["dynamics"]  # no temporary or old folders
    assert not (run / "eval" / "dynamics" / "stale.txt").exists()


# ----- lm-evaluation-harness adapter --------------------------------------------------------------------------------
LOCAL_TASK = """task: gt_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
PAIRS = [("The sky is", " blue."), ("Once upon a", " time"), ("", "Hello"), ("def f(x):", " return x")]


@pytest.mark.slow
def test_lm_eval_adapter_matches_the_model_and_runs_through_lm_evals_cli(runs, tmp_path):
    pytest.importorskip("lm_eval")
    from types import SimpleNamespace

    import torch

    from groundthink.evaluation.harness import GroundThinkHarnessLM

    lm = GroundThinkHarnessLM(pretrained=str(runs["trained"]), device="cuda", batch_size=2, max_length=7)
    tok, model = lm.tokenizer, lm.model
    scores = lm.loglikelihood([SimpleNamespace(args=p) for p in PAIRS])
    for (context, continuation), (score, greedy) in zip(PAIRS, scores):
        ctx = tok.encode(context) or [tok.eos_id]
        ids = ctx + tok.encode(continuation)
        with torch.no_grad():
            logp = model(torch.tensor([ids]), model.init_state(1))[0][0].double().log_softmax(-1)
        own = sum(float(logp[t - 1, ids[t]]) for t in range(len(ctx), len(ids)))
        assert score == pytest.approx(own, abs=1e-5) and isinstance(greedy, bool)
    text = "A longer text than one forward pass of max_length=7 tokens, read with carried state."
    (rolling,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    ids = [tok.eos_id, *tok.encode(text)]
    with torch.no_grad():
        logp = model(torch.tensor([ids]), model.init_state(1))[0][0].double().log_softmax(-1)
    assert rolling == pytest.approx(sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids))), abs=1e-4)
    (generated,) = lm.generate_until([SimpleNamespace(args=("Once upon", {"until": ["\n"], "max_gen_toks": 8}))])
    assert isinstance(generated, str) and "\n" not in generated and len(generated) <= 8 * 4

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"context": c or "Hi", "continuation": t}) + "\n" for c, t in PAIRS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gt_local.yaml").write_text(LOCAL_TASK.format(data=data))
    run_cli(tmp_path, "groundthink.evaluation.harness", "--model", "groundthink", "--model_args",
            f"pretrained={runs['trained']}", "--include_path", str(tmp_path / "tasks"), "--tasks", "gt_local",
            "--output_path", str(tmp_path / "results"))
    (result,) = (tmp_path / "results").rglob("results_*.json")
    metrics = json.loads(result.read_text())["results"]["gt_local"]
    assert math.isfinite(metrics["perplexity,none"]) and 0.0 <= metrics["acc,none"] <= 1.0
