"""Evaluation tasks for `groundthink-eval` (conf/eval/<task>.yaml), each a registered class (tasks/base.py).

| task | measures | module |
|---|---|---|
| lm | held-out ppl/bpb carried vs reset; loss by token position out to max_tokens | lm |
| passkey | passkey retrieval accuracy vs distance, carried state | passkey |
| mqar | multi-query associative recall accuracy per (seq_len, kv_pairs) | mqar |
| generation | streamed tokens/s and resident memory over N tokens | generation |
| persona | persona facts kept over filler conversation turns, vs distance | persona |
| dynamics | change points in the run's training curves (no model) | dynamics |

Importing this package registers them all.
"""

from groundthink.evaluation.tasks import dynamics, generation, lm, mqar, passkey, persona  # noqa: F401,I001
from groundthink.evaluation.tasks.base import TASKS, EvalError, EvalTask, register_task

__all__ = ["TASKS", "EvalError", "EvalTask", "register_task"]
