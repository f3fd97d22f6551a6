"""Language-model loss of runs on the same text (4000 characters of groundthink/training/module.py), to see what
RL did to the parent's language modelling: python experiments/rl-reinforce/lm_loss.py RUN [RUN ...]"""

import sys

import torch

import groundthink
from groundthink.generation import prefill

torch.set_num_threads(1)
text = open('groundthink/training/module.py').read()[:4000]
for path in sys.argv[1:]:
    run = groundthink.load(path)
    ids = run.tokenizer.encode(text)
    logits, _ = prefill(run.model, ids, run.model.init_state(1), all_logits=True)
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    print(path.split('/')[-2], f"{float(nll):.3f} nats/char on 4000 chars of module.py")
