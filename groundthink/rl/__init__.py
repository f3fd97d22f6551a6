"""stage=rl: REINFORCE with a learned value baseline over completions sampled from a trained GroundThink policy.

- settings.py: `RLSettings`, the `rl` config block (conf/stage/rl.yaml), and its checks.
- rewards.py: the registry of tasks with verifiable rewards (copy, arithmetic, passkey, mqar), all on CPU.
- loss.py: the advantages and the REINFORCE loss as plain tensor functions.
- module.py: `RLModule`, the LightningModule (sampling through groundthink.generation, the REINFORCE loss).
- callbacks.py: validation reward every N episodes, early stopping, the best checkpoint, episode throughput.
- stage.py: assembling an RL run from the config (the hook groundthink/train.py calls for stage=rl).
"""
