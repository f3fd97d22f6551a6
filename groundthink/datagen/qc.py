"""The QC gate: measure a generated dataset against thresholds, write qc_summary.json, PASS or FAIL.

    groundthink-datagen qc outputs/datagen/<name>            # a run folder (its config.yaml has the thresholds)
    groundthink-datagen qc some.jsonl --set "median_output_tokens=< 40"

Populations (a run folder): `final` = the chat records in data/; `generated` = every response the model wrote
(phases/responses-* for stage1, else the final records), so filtering cannot hide a generator problem; the
critics' records in phases/. A single file is both populations. Metrics, each with the ids that fail it:

| metric | over | default threshold |
|---|---|---|
| records | final | > 0 |
| invalid_json_lines | every .jsonl line in the run (data/, phases/, rejects.jsonl) | == 0 |
| duplicate_ids | final | == 0 |
| non_stop_finish (finish_reason not a normal stop) | final | == 0 |
| empty_outputs | final | == 0 |
| token_limit_rate (finish_reason "length") | generated | < 0.10 |
| runaway_rate (cut at a delimiter, or repetitive) | generated | < 0.05 |
| delimiter_leakage (a delimiter/control marker in the text) | final | == 0 |
| median_output_tokens | final | pipeline's (stage1 pilot: < 40) |
| instruction_acceptance, pair_acceptance | critic records | >= 0.5 (stage1) |

Thresholds are strings "<op> <number>" with op one of < <= > >= == (strict where the plan says so: a pilot with
a token-limit rate of exactly 10% fails "< 0.10"); null turns a check into a report-only number. A metric with
nothing to measure (no critic records) is "n/a" and does not decide the verdict.
"""

from __future__ import annotations

import json
import math
import operator
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from groundthink.datagen.text import is_runaway, leaked

SUMMARY_FILE = "qc_summary.json"
MAX_IDS = 1000
METRICS = ("records", "invalid_json_lines", "duplicate_ids", "non_stop_finish", "empty_outputs", "token_limit_rate",
           "runaway_rate", "delimiter_leakage", "median_output_tokens", "instruction_acceptance", "pair_acceptance")
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq}
_THRESHOLD = re.compile(r"^\s*(<=|>=|==|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


class QCError(ValueError):
    """Input QC cannot judge (no such file, a bad threshold); exit code 2, not a FAIL verdict."""


def parse_threshold(name: str, text: Any) -> tuple[str, float] | None:
    if text is None:
        return None
    match = _THRESHOLD.match(str(text))
    if not match:
        raise QCError(f"qc.thresholds.{name}={text!r}: write a comparison such as '< 0.10', '>= 0.5' or '== 0' "
                      f"(or null to only report the number)")
    return match.group(1), float(match.group(2))


@dataclass
class Metric:
    name: str
    value: float | None
    threshold: str | None
    over: str
    n: int
    ids: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def status(self) -> str:
        if self.value is None:
            return "n/a"
        if self.threshold is None:
            return "report"
        op, limit = parse_threshold(self.name, self.threshold)
        return "PASS" if _OPS[op](self.value, limit) else "FAIL"

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "threshold": self.threshold, "status": self.status,
                "passed": {"PASS": True, "FAIL": False}.get(self.status), "over": self.over, "n": self.n,
                "ids": self.ids[:MAX_IDS], "ids_total": len(self.ids), "note": self.note}


@dataclass
class Jsonl:
    records: list[dict[str, Any]]
    invalid: list[str]  # "file:line" of each line that is not a JSON object


def read_jsonl(paths: list[Path]) -> Jsonl:
    records, invalid = [], []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    invalid.append(f"{path}:{number}")
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    invalid.append(f"{path}:{number}")
                    continue
                if isinstance(record, dict):
                    records.append(record)
                else:
                    invalid.append(f"{path}:{number}")
    return Jsonl(records, invalid)


def output_text(record: dict[str, Any]) -> str:
    """The model's output in a record: the last assistant message of a chat record, else its `text`."""
    for message in reversed(record.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "assistant":
            return str(message.get("content") or "")
    return str(record.get("text") or "")


def _rid(record: dict[str, Any], i: int) -> str:
    return str(record.get("id", f"#{i}"))


def _rate(hits: list[str], n: int) -> float | None:
    return len(hits) / n if n else None


def evaluate(target: str | Path, qc: dict[str, Any]) -> dict[str, Any]:
    """Measure `target` (a run folder or a JSONL file) against qc = {thresholds, normal_finish_reasons,
    delimiters}; returns the summary (not yet written)."""
    target = Path(target)
    thresholds = dict(qc.get("thresholds") or {})
    for name, text in thresholds.items():
        if name not in METRICS:
            raise QCError(f"qc.thresholds.{name}: no such QC metric; the metrics are {', '.join(METRICS)}")
        parse_threshold(name, text)
    normal = set(qc.get("normal_finish_reasons") or ["stop"])
    delimiters = [d for d in (qc.get("delimiters") or []) if d]
    if target.is_dir():
        data_files = sorted((target / "data").glob("*.jsonl"))
        if not data_files and not (target / "manifest.json").is_file():
            raise QCError(f"{target} holds no data/*.jsonl and no manifest.json: it is not a groundthink-datagen run "
                          f"folder (pass the folder the run printed, or one JSONL file)")
        phase_files = sorted((target / "phases").glob("*.jsonl"))
        every_file = data_files + phase_files + ([target / "rejects.jsonl"] if (target / "rejects.jsonl").exists()
                                                 else [])
        final = read_jsonl(data_files)
        generated_files = [p for p in phase_files if p.name.startswith("responses-")]
        generated = read_jsonl(generated_files).records if generated_files else final.records
        critic = {name: read_jsonl([p for p in phase_files if p.name.startswith(f"{name}-")]).records
                  for name in ("instruction_critic", "pair_critic")}
        invalid = read_jsonl(every_file).invalid
    elif target.is_file():
        final = read_jsonl([target])
        generated, invalid = final.records, final.invalid
        critic = {"instruction_critic": [], "pair_critic": []}
        for record in final.records:
            for key, name in (("instruction", "instruction_critic"), ("pair", "pair_critic")):
                verdict = (record.get("critics") or {}).get(key)
                if verdict is not None:
                    critic[name].append({"id": record.get("id"), "critic": verdict})
    else:
        raise QCError(f"{target} does not exist; pass a groundthink-datagen run folder or a JSONL file")

    records = final.records
    metrics: list[Metric] = []

    def add(name: str, value: float | None, over: str, n: int, ids: list[str] | None = None, note: str = "") -> None:
        metrics.append(Metric(name, value, thresholds.get(name), over, n, ids or [], note))

    add("records", float(len(records)), "final", len(records))
    add("invalid_json_lines", float(len(invalid)), "all jsonl", len(invalid), invalid)
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        seen[_rid(r, i)] = seen.get(_rid(r, i), 0) + 1
    dups = sorted(k for k, v in seen.items() if v > 1)
    add("duplicate_ids", float(len(dups)), "final", len(records), dups)
    non_stop = [_rid(r, i) for i, r in enumerate(records) if r.get("finish_reason") not in normal]
    add("non_stop_finish", float(len(non_stop)), "final", len(records), non_stop,
        f"normal: {', '.join(sorted(normal))}")
    empty = [_rid(r, i) for i, r in enumerate(records) if not output_text(r).strip()]
    add("empty_outputs", float(len(empty)), "final", len(records), empty)
    limit = [_rid(r, i) for i, r in enumerate(generated) if r.get("finish_reason") == "length"]
    add("token_limit_rate", _rate(limit, len(generated)), "generated", len(generated), limit)
    runaway = [_rid(r, i) for i, r in enumerate(generated)
               if (r["runaway"] if isinstance(r.get("runaway"), bool) else is_runaway(output_text(r), r.get("cut_at")))]
    add("runaway_rate", _rate(runaway, len(generated)), "generated", len(generated), runaway)
    leaks = [_rid(r, i) for i, r in enumerate(records)
             if any(leaked(str(m.get("content") or ""), delimiters) for m in (r.get("messages") or [])
                    if isinstance(m, dict) and m.get("role") == "assistant")
             or (not r.get("messages") and leaked(output_text(r), delimiters))]
    add("delimiter_leakage", float(len(leaks)), "final", len(records), leaks)
    tokens = [r["usage"]["output_tokens"] for r in records
              if isinstance(r.get("usage"), dict) and isinstance(r["usage"].get("output_tokens"), (int, float))]
    add("median_output_tokens", float(statistics.median(tokens)) if tokens else None, "final", len(tokens))
    for name, metric in (("instruction_critic", "instruction_acceptance"), ("pair_critic", "pair_acceptance")):
        judged = critic[name]
        refused = [_rid(r, i) for i, r in enumerate(judged) if not (r.get("critic") or {}).get("accepted")]
        value = (len(judged) - len(refused)) / len(judged) if judged else None
        add(metric, value, name, len(judged), refused, "ids listed are the ones not accepted")

    gating = [m for m in metrics if m.status in ("PASS", "FAIL")]
    verdict = "FAIL" if any(m.status == "FAIL" for m in gating) else "PASS"
    return {
        "format": "groundthink-datagen-qc",
        "version": 1,
        "target": str(target),
        "verdict": verdict,
        "failed": [m.name for m in gating if m.status == "FAIL"],
        "metrics": {m.name: m.as_dict() for m in metrics},
        "normal_finish_reasons": sorted(normal),
        "delimiters": delimiters,
    }


def summary_path(target: str | Path, out: str | Path | None = None) -> Path:
    if out is not None:
        return Path(out)
    target = Path(target)
    return (target if target.is_dir() else target.parent) / SUMMARY_FILE


def write_summary(summary: dict[str, Any], path: Path) -> Path:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def format_table(summary: dict[str, Any]) -> str:
    lines = [f"QC {summary['target']}: {summary['verdict']}"]
    width = max(len(name) for name in summary["metrics"])
    for name, m in summary["metrics"].items():
        value = m["value"]
        shown = "—" if value is None else (f"{value:.4g}" if not float(value).is_integer() else f"{int(value)}")
        if value is not None and math.isfinite(value) and name.endswith(("rate", "acceptance")):
            shown = f"{100 * value:.1f}%"
        threshold = m["threshold"] or ""
        extra = f"  e.g. {', '.join(m['ids'][:3])}" if m["status"] == "FAIL" and m["ids"] else ""
        lines.append(f"  {name:<{width}}  {shown:>8}  {threshold:<8}  {m['status']}  (n={m['n']}){extra}")
    return "\n".join(lines)
