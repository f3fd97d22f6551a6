"""Does the learned baseline reduce the variance of the policy-gradient estimate? (issue 16, acceptance)

At fixed weights (an RL run's step checkpoint: the policy and its trained value head), draw K batches of episodes
(new prompts, completions sampled with seeds 0..K-1) and compute the policy-gradient estimate of each batch,
g_k = grad of -mean_i(A_i * logp_i) with respect to the LM's parameters, under four advantage settings on the very
same samples: rl.baseline on/off x rl.normalize_advantages on/off. Reported per setting:

    variance = mean_k ||g_k - mean g||^2     (the trace of the estimate's covariance)
    signal   = ||mean g||^2
    snr      = signal / variance * K         (scale-free: normalisation rescales g, so compare baselines within
                                              one normalisation setting, or compare snr)

    python experiments/rl-reinforce/grad_variance.py <rl run folder> --steps 10 20 40 --repeats 16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def measure(run_dir: Path, step: int, repeats: int) -> dict[str, dict[str, float]]:
    import groundthink
    from groundthink.rl.loss import advantages
    from groundthink.rl.module import RLModule
    from groundthink.rl.rewards import build_task
    from groundthink.rl.settings import RLSettings
    from groundthink.training.checkpoint import load_checkpoint
    from groundthink.training.settings import OptimSettings

    ckpt = run_dir / "checkpoints" / f"step_{step:07d}.safetensors"
    run = groundthink.load(ckpt)
    tensors, _ = load_checkpoint(ckpt)
    rl = RLSettings(**run.config["rl"])
    seed = int(run.config["seed"])
    task = build_task(rl.reward, rl.task, tokenizer=run.tokenizer, vocab_size=run.model.cfg.vocab_size, seed=seed)
    module = RLModule(run.model, run.tokenizer, task, rl=rl, optim=OptimSettings(), max_steps=1, seed=seed)
    module.value_head.load_state_dict({"weight": tensors["state_dict.value_head.weight"],
                                       "bias": tensors["state_dict.value_head.bias"]})
    run.model.train()
    params = [p for p in run.model.parameters() if p.requires_grad]
    settings = {f"baseline={b} normalize={n}": (b, n) for n in (False, True) for b in (False, True)}
    grads: dict[str, list[torch.Tensor]] = {k: [] for k in settings}
    rewards = []
    for k in range(repeats):
        episodes = module.episodes(100_000 + k)  # prompts the run never trained on
        completions = module.sample(episodes, temperature=rl.temperature, seed=k)
        r = module.rewards_of(episodes, completions)
        rewards.append(float(r.mean()))
        scored = module.score(episodes, completions)
        for name, (baseline, normalize) in settings.items():
            adv = advantages(r, scored["values"] if baseline else None, normalize)
            loss = -(adv * scored["logp"]).mean()
            g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            grads[name].append(torch.cat([(x if x is not None else torch.zeros_like(p)).flatten()
                                          for x, p in zip(g, params)]).double())
    out = {"_": {"step": step, "mean_reward": sum(rewards) / len(rewards)}}
    for name, gs in grads.items():
        G = torch.stack(gs)
        mean = G.mean(0)
        var = float(((G - mean) ** 2).sum(1).mean())
        signal = float((mean ** 2).sum())
        out[name] = {"variance": var, "signal": signal, "snr": signal / var * repeats}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40])
    ap.add_argument("--repeats", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="append the results as JSON lines here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for step in args.steps:
        result = measure(args.run, step, args.repeats)
        info = result.pop("_")
        print(f"{args.run.name} step {step}: mean sampled reward {info['mean_reward']:.3f}")
        for name, r in result.items():
            print(f"  {name:32s} variance {r['variance']:.4g}  signal {r['signal']:.4g}  snr {r['snr']:.3f}")
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({"run": args.run.name, **info, "results": result}) + "\n")


if __name__ == "__main__":
    main()
