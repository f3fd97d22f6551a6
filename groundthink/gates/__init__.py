"""Gates G0-G5 (SPEC §4): configs that end in a machine-readable PASS/FAIL verdict, `<run dir>/gates.json`.

| gate | checks | module |
|---|---|---|
| G0 | every control token encodes as one token | static_checks |
| G1 | forward works, finite, shapes, finite gradients, carried state continues | static_checks |
| G2 | state entropy at step 0 in a (warning) band | static_checks |
| G3 | 1k steps: loss decreasing, mean gradient norm in a band | run_checks |
| G3.5 | state health: cosine, top-5 SVD energy, decay saturation | run_checks |
| G3.6 | candidate vs baseline run: val loss ratio, not diverging, gradient ratios | run_checks |
| G4 | the evaluation runs and logs finite metrics | run_checks + groundthink.evaluation |
| G5 | target validation loss | run_checks |

Gate runs: `groundthink-train gate=g3 ...` (conf/gate/). Each gate registers itself (registry.py) in the module
that checks it; importing this package registers them all. The verdict logic is in runner.py, the report format
in report.py, the command line (`groundthink-gate static | check | matrix`) in cli.py.
"""

from groundthink.gates import run_checks, static_checks  # noqa: F401  (registers G0-G5)
from groundthink.gates.registry import GATES, GateContext, GateSpec, gate_name, register_gate
from groundthink.gates.report import Criterion, GateReport
from groundthink.gates.runner import check_gate_config, evaluate_gate, finish_gate_run

__all__ = ["GATES", "Criterion", "GateContext", "GateReport", "GateSpec", "check_gate_config", "evaluate_gate",
           "finish_gate_run", "gate_name", "register_gate"]
