"""stage=rl (issue 16): the rewards, the REINFORCE loss by hand, the scoring pass against the generation engine's
scores, bad input, and through the real CLI: pretrain tiny -> rl (early stopping, best/last checkpoints, loading
as a plain LM) and an exact resume after SIGTERM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests._trained_run import trained_tiny_run
from tests.conftest import read_column, run_dirs, run_train


def _char_task(name: str, seed: int = 3, **options):
    from groundthink.data.tokenizer import build_tokenizer
    from groundthink.rl.rewards import build_task

    tok = build_tokenizer("char")
    return tok, build_task(name, options, tokenizer=tok, vocab_size=tok.vocab_size, seed=seed)


# ----- rewards (fast, exact) ---------------------------------------------------------------------------------
def test_copy_and_arithmetic_episodes_are_deterministic_and_scored_per_token():
    from groundthink.rl.rewards import token_match_reward

    tok, task = _char_task("copy", alphabet="xyz", min_len=2, max_len=5, template="{s}|{s}|")
    ep = task.episode(7, "train")
    prompt = tok.decode(ep.prompt_ids)
    s = tok.decode(ep.answer_ids)
    assert prompt == f"{s}|{s}|" and 2 <= len(s) <= 5 and set(s) <= set("xyz") and ep.max_tokens == len(s)
    assert task.episode(7, "train") == ep and task.episode(7, "val") != ep  # splits differ (seeded per split)
    assert [task.episode(i, "train") for i in range(20)] != [_char_task("copy", seed=4, alphabet="xyz", min_len=2,
                                                             max_len=5, template="{s}|{s}|")[1].episode(i, "train")
                                                             for i in range(20)]
    assert task.reward(ep, ep.answer_ids) == 1.0
    wrong_first = [tok.encode("q")[0]] + ep.answer_ids[1:]
    assert task.reward(ep, wrong_first) == pytest.approx((len(s) - 1) / len(s))
    assert task.reward(ep, []) == 0.0
    assert token_match_reward([1, 2, 3, 4], [1, 9, 3]) == 0.5  # a missing token is a wrong one
    _, arith = _char_task("arithmetic", max_operand=99)
    for i in range(30):
        ep = arith.episode(i, "val")
        a, b = tok.decode(ep.prompt_ids).rstrip("=").split("+")
        assert tok.decode(ep.answer_ids) == str(int(a) + int(b))


def test_passkey_and_mqar_answers_are_the_ones_in_the_prompt():
    from groundthink.data.synthetic import PasskeyTokens

    _, pk = _char_task("passkey", distance=5, passkey_len=3, prefix_len=2)
    marks = PasskeyTokens.for_vocab(264)
    for i in range(10):
        ep = pk.episode(i, "train")
        key = ep.prompt_ids.index(marks.key_id)
        assert ep.prompt_ids[-1] == marks.query_id and len(ep.prompt_ids) == 2 + 1 + 3 + 5 + 1
        assert ep.answer_ids == ep.prompt_ids[key + 1:key + 4] and set(ep.answer_ids) <= set(marks.digits)
        assert pk.reward(ep, ep.answer_ids[:2] + [marks.key_id]) == pytest.approx(2 / 3)
    _, mq = _char_task("mqar", num_kv_pairs=3, vocab=64)
    for i in range(10):
        ep = mq.episode(i, "val")
        pairs, key = ep.prompt_ids[:6], ep.prompt_ids[6]
        assert len(ep.prompt_ids) == 7 and dict(zip(pairs[0::2], pairs[1::2]))[key] == ep.answer_ids[0]
        assert all(1 <= k < 32 for k in pairs[0::2]) and all(32 <= v < 64 for v in pairs[1::2])


def test_unknown_reward_bad_settings_and_unknown_task_keys_are_refused_by_name():
    from groundthink.rl.settings import RLSettings

    with pytest.raises(ValueError, match=r"rl.reward='nope' is not a registered reward; registered: \['arithmetic', "
                                         r"'copy', 'mqar', 'passkey'\]"):
        RLSettings(reward="nope").check()
    with pytest.raises(ValueError, match="rl.batch_size=0 must be >= 1"):
        RLSettings(batch_size=0).check()
    with pytest.raises(ValueError, match="rl.temperature=0.0 must be > 0"):
        RLSettings(temperature=0.0).check()
    assert RLSettings().max_steps == 313 and RLSettings(num_episodes=64, batch_size=32).max_steps == 2
    with pytest.raises(ValueError, match=r"rl.task has unknown key\(s\) \['alphabets'\] for rl.reward=copy"):
        _char_task("copy", alphabets="ab")
    with pytest.raises(ValueError, match="passkey_len >= 1"):
        _char_task("passkey", passkey_len=0)


# ----- the loss by hand (fast) -------------------------------------------------------------------------------
def test_advantages_and_reinforce_loss_match_a_hand_computation():
    from groundthink.rl.loss import advantages, reinforce_loss

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    values = torch.tensor([0.5, 0.5, 0.25, 0.75], requires_grad=True)
    logp = torch.tensor([-1.0, -2.0, -3.0, -4.0], requires_grad=True)
    raw = [0.5, -0.5, 0.25, -0.25]  # R - V
    mean = sum(raw) / 4
    std = (sum((a - mean) ** 2 for a in raw) / 4) ** 0.5
    hand_adv = [(a - mean) / (std + 1e-8) for a in raw]
    assert advantages(rewards, values, normalize=True).tolist() == pytest.approx(hand_adv, abs=1e-6)
    assert advantages(rewards, values, normalize=False).tolist() == pytest.approx(raw)
    assert advantages(rewards, None, normalize=False).tolist() == rewards.tolist()
    assert advantages(torch.full((4,), 0.25), values, normalize=True).tolist() == [0.0] * 4  # nothing to learn
    entropy = torch.tensor(2.0, requires_grad=True)
    loss, parts = reinforce_loss(logp, entropy, rewards, values, normalize=True, value_coef=0.5, entropy_coef=0.01)
    pg = -sum(a * lp for a, lp in zip(hand_adv, [-1.0, -2.0, -3.0, -4.0])) / 4
    mse = sum((v - r) ** 2 for v, r in zip([0.5, 0.5, 0.25, 0.75], [1.0, 0.0, 0.5, 0.5])) / 4
    assert float(parts["pg_loss"].detach()) == pytest.approx(pg, abs=1e-6)
    assert float(parts["value_loss"].detach()) == pytest.approx(mse)
    assert float(loss.detach()) == pytest.approx(pg + 0.5 * mse - 0.01 * 2.0, abs=1e-6)
    loss.backward()
    # d loss / d logp_i = -A_i / B; the values get only the squared-error gradient (advantages are detached)
    assert logp.grad.tolist() == pytest.approx([-a / 4 for a in hand_adv], abs=1e-6)
    assert values.grad.tolist() == pytest.approx([0.5 * 2 * (v - r) / 4 for v, r in
                                                  zip([0.5, 0.5, 0.25, 0.75], [1.0, 0.0, 0.5, 0.5])])
    assert float(entropy.grad) == pytest.approx(-0.01)


@pytest.mark.slow  # imports Lightning (seconds on a loaded 2-core machine); the test itself is fast
def test_scoring_pass_matches_the_engine_and_sampling_is_seeded():
    """RLModule.score's padded forward gives each completion the log-likelihood the generation engine gives it;
    the value head reads the hidden state detached (its loss cannot move the LM)."""
    from groundthink.generation import GenerationEngine
    from groundthink.models import HybridLM, ModelConfig
    from groundthink.rl.module import RLModule
    from groundthink.rl.settings import RLSettings
    from groundthink.training.settings import OptimSettings

    torch.manual_seed(0)
    model = HybridLM(ModelConfig.from_dict(dict(vocab_size=264, d_model=32, n_layers=2, pattern="H", ffn_mult=2.0)))
    tok, task = _char_task("copy", alphabet="abc", min_len=1, max_len=5)
    module = RLModule(model, tok, task, rl=RLSettings(batch_size=6), optim=OptimSettings(), max_steps=1, seed=5)
    episodes = module.episodes(1)
    assert len({len(e.prompt_ids) for e in episodes}) > 1  # mixed lengths: the padding is exercised
    completions = module.sample(episodes, temperature=1.0, seed=11)
    assert completions == module.sample(episodes, temperature=1.0, seed=11)
    assert completions != module.sample(episodes, temperature=1.0, seed=12)
    assert [len(c) for c in completions] == [e.max_tokens for e in episodes]
    scored = module.score(episodes, completions)
    engine = GenerationEngine.for_model(model, tok)
    expected = []
    for e, c in zip(episodes, completions):  # the engine's per-token log-probabilities of the completion's ids
        _, lps = engine.prompt_logprobs(e.prompt_ids + c)
        expected.append(sum(lp.logprob for lp in lps[len(e.prompt_ids):]))
    assert scored["logp"].tolist() == pytest.approx(expected, abs=1e-4)
    scored["values"].sum().backward()
    assert all(p.grad is None for p in model.parameters()) and module.value_head.weight.grad is not None
    assert module.entropy_coef(1) == 0.01 and module.entropy_coef(3) == pytest.approx(0.01 * 0.995 ** 2)


def test_validation_is_due_every_n_episodes():
    from groundthink.rl.settings import validation_due

    due = [s for s in range(1, 40) if validation_due(s, 32, 100)]
    assert due == [4, 7, 10, 13, 16, 19, 22, 25, 29, 32, 35, 38]  # 128, 224, 320, ... cross multiples of 100
    assert [s for s in range(1, 5) if validation_due(s, 4, 4)] == [1, 2, 3, 4]
    assert not any(validation_due(s, 4, 0) for s in range(1, 5))


# ----- real CLI ----------------------------------------------------------------------------------------------------
RL = ["stage=rl", "model=tiny", "logger=csv", "name=rl", "callbacks.progress_bar=false", "trainer.log_every_n_steps=1",
      "rl.batch_size=4", "rl.num_episodes=32", "rl.val_episodes=4", "rl.val_every_episodes=4", "optim.lr=1e-3",
      "optim.warmup_steps=2", "callbacks.checkpoint.every_n_steps=100",
      # patience 2 with an improvement bar no reward in [0, 1] can clear: the first validation (step 1) is the
      # best, steps 2 and 3 are not, so the run stops early at step 3 of 8.
      "rl.patience=2", "rl.min_delta=1.0"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    return trained_tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def rl_run(parent, tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("rl_full")
    args = [*RL, f"init_from={parent}"]
    run_train(root, *args)
    (run,) = run_dirs(root, "rl")
    return run, args


@pytest.mark.slow
def test_rl_from_the_tiny_run_logs_stops_early_and_loads_as_a_plain_lm(parent, rl_run):
    import groundthink
    from groundthink.training.checkpoint import load_checkpoint

    run, _ = rl_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 3  # early stop, not max steps (8)
    assert summary["final"]["rl/early_stop_step"] == 3.0
    assert summary["parent"]["run_dir"] == str(parent.resolve())
    assert sorted(read_column(run, "val/reward")) == [0, 1, 2, 3]  # the starting policy, then every 4 episodes
    assert sorted(read_column(run, "train/reward")) == [1, 2, 3]
    for col in ("train/loss", "train/pg_loss", "train/value_loss", "train/entropy", "train/entropy_coef"):
        assert len(read_column(run, col)) == 3, col
    assert read_column(run, "train/entropy_coef")[3] == pytest.approx(0.01 * 0.995 ** 2)
    ckpts = run / "checkpoints"
    assert (ckpts / "best.safetensors").exists() and json.loads((ckpts / "best.json").read_text())["step"] == 1
    assert json.loads((ckpts / "last.json").read_text())["step"] == 3
    tensors, meta = load_checkpoint(ckpts / "last.safetensors")
    assert "state_dict.value_head.weight" in tensors and meta["rl"]["bad_validations"] == 2
    for path in (run, ckpts / "best.safetensors"):
        loaded = groundthink.load(path)
        assert not any("value_head" in k for k in loaded.model.state_dict())
        assert loaded.tokenizer.kind == "char"
        logits, _ = loaded.model(torch.tensor([[5, 6, 7]]))
        assert torch.isfinite(logits).all()
    assert groundthink.load(run).step == 3 and groundthink.load(ckpts / "best.safetensors").step == 1


@pytest.mark.slow
def test_rl_resume_after_sigterm_is_exact(rl_run, tmp_path):
    full, args = rl_run
    run_train(tmp_path, *args, "faults.sigterm_at_step=2", expect_rc=None)
    (part,) = run_dirs(tmp_path, "rl")
    assert json.loads((part / "summary.json").read_text())["status"] == "interrupted"
    run_train(tmp_path, *args, f"resume={part}")
    assert json.loads((part / "summary.json").read_text())["step"] == 3  # the early stop survives the resume
    for column in ("train/reward", "train/loss", "train/value_loss", "val/reward"):
        a, b = read_column(full, column), read_column(part, column)
        assert sorted(a) == sorted(b), column
        diff = max(abs(a[s] - b[s]) for s in a)
        print(f"RL resume after SIGTERM: {column} max |diff| {diff:.3g}")
        assert diff <= 1e-6, column


@pytest.mark.slow
def test_stage_rl_bad_input_fails_before_anything_with_one_line(tmp_path):
    proc = run_train(tmp_path, "stage=rl", "name=rl", "init_from=/nowhere", "rl.reward=nope", expect_rc=1)
    error = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "rl.reward='nope' is not a registered reward" in error[0], proc.stderr[-2000:]
    assert run_dirs(tmp_path, "rl") == []
    from omegaconf import OmegaConf

    from groundthink.training import lineage
    from groundthink.training.run import UserError

    with pytest.raises(UserError, match="stage=rl starts from a trained run: give init_from="):
        lineage.required(OmegaConf.create({"stage": "rl", "init_from": None}))


def test_resuming_an_rl_run_at_its_episode_budget_names_rl_num_episodes(tmp_path):
    """An RL run's step budget is rl.num_episodes / rl.batch_size: the message and the suggestion say so."""
    from groundthink.training.checkpoint import save_checkpoint
    from groundthink.training.errors import NothingToTrain
    from groundthink.training.run import RunFolder

    save_checkpoint(tmp_path / "checkpoints", "last", {"w": torch.zeros(1)}, {"step": 3})
    with pytest.raises(NothingToTrain, match=r"at step 3 and rl\.num_episodes=12 \(3 steps\).*rl\.num_episodes=24"):
        RunFolder(tmp_path, resume=True, budget=("rl.num_episodes", 12, 3))
    assert RunFolder(tmp_path, resume=True, budget=("rl.num_episodes", 16, 4)).resume_step == 3
