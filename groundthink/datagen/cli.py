"""`groundthink-datagen`: the synthetic data generation entry point (a Hydra app; conf/datagen.yaml is its root).

    groundthink-datagen backend=openai backend.base_url=http://127.0.0.1:8000/v1 backend.model=m pipeline=responses
    groundthink-datagen backend=groundthink backend.run=outputs/default/<run> pipeline=stage1 \\
        prompts=seed_instructions count=100                      # pilot; the same command with count=15000 scales
    groundthink-datagen qc outputs/datagen/<name>                # the QC gate alone (exit code 1 on FAIL)

This is the only datagen code that sees a DictConfig: it resolves the config into plain settings, builds the
backend, the prompt set and the pipeline, checks everything that can be checked before generation (settings,
prompt budgets, the contamination guard's sentinels, the backend's reachability, and that a folder being resumed
was made with the same recipe), runs the pipeline, then the QC gate, and writes config.yaml, qc_summary.json and
manifest.json into the run folder <output_root>/datagen/<name>/.

Exit codes: 0 done and QC PASS; 1 an error, a refusal or QC FAIL; 130/143 interrupted by SIGINT/SIGTERM (run
the same command again to resume).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
CONFIG_NAME = "datagen"
# Override keys that would put a secret on the command line (and so into shell history and provenance): a bare
# `key`, or a name ending in a secret's name (api_key, openai_api_key, secret_key, auth_token, password, ...).
# Settings that merely mention a key are not secrets: backend.api_key_env names a variable, and
# backend.allow_missing_key is a switch. No settings dataclass or config group defines a secret-bearing field.
_SECRET_KEY = re.compile(
    r"^(?:key|(?:.*[_-])?(?:api[_-]?key|(?:secret|private|access|auth)[_-]?key|secret|password|passwd|token"
    r"|access[_-]?token|bearer))$",
    re.IGNORECASE)
# What an invocation refused before any work leaves in a new folder; such a folder is removed again.
_SCAFFOLDING = (".lock", "datagen.log", "rejects.jsonl")


_APP_STARTED = False


class UserError(Exception):
    """A problem with the user's input: printed as one paragraph, without a traceback; exit code 1."""


def refuse_secret_overrides(argv: list[str]) -> None:
    for arg in argv:
        key = arg.split("=", 1)[0].lstrip("+~")
        if "=" in arg and _SECRET_KEY.match(key.rsplit(".", 1)[-1]):
            raise UserError(
                f"'{key}=...' on the command line: secrets are never taken from the command line, because the "
                f"command is recorded in the run's manifest. Put the key in an environment variable and name it "
                f"with backend.api_key_env=VARIABLE (default OPENAI_API_KEY)"
            )


def effective_qc(config: dict[str, Any]) -> dict[str, Any]:
    """The root qc settings with the pipeline's threshold overrides (pipeline.qc) merged in."""
    qc = dict(config.get("qc") or {})
    thresholds = dict(qc.get("thresholds") or {})
    thresholds.update((config.get("pipeline") or {}).get("qc") or {})
    qc["thresholds"] = thresholds
    return qc


def recipe(config: dict[str, Any], generator: dict[str, Any]) -> dict[str, Any]:
    """What must stay the same for records in one folder to belong together (count, concurrency, shard size,
    retries and QC may change between invocations)."""
    identity = {k: generator[k] for k in ("backend", "model", "checkpoint_sha256", "config_sha256") if k in generator}
    pipeline = {k: v for k, v in config["pipeline"].items() if k != "qc"}
    return {"pipeline": pipeline, "generator": identity, "seed": config["seed"], "prompts": config["prompts"]}


def check_recipe(previous: dict[str, Any], this_recipe: dict[str, Any], out_dir: Path, config: dict[str, Any]) -> None:
    old = previous.get("recipe")
    if not old or old == this_recipe or config["allow_recipe_change"]:
        return
    changes = _differences(old, this_recipe)
    raise UserError(
        f"{out_dir} was made with a different recipe, so new records would not belong with the old ones:\n  "
        + "\n  ".join(changes[:12])
        + "\nUse another name= for a new dataset, or allow_recipe_change=true to continue anyway")


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _secrets(config: dict[str, Any]) -> list[str]:
    env = (config.get("backend") or {}).get("api_key_env")
    value = os.environ.get(env) if env else None
    return [value] if value else []


def run(cfg: DictConfig) -> int:
    from hydra.core.hydra_config import HydraConfig

    from groundthink.datagen.backends import FatalBackendError, build_backend
    from groundthink.datagen.backends.base import RequestRejected
    from groundthink.datagen.manifest import CONFIG_FILE, load_manifest, write_manifest
    from groundthink.datagen.pipelines import PIPELINES, PipelineError, RunContext
    from groundthink.datagen.prompts import PromptSetError, load_prompt_set
    from groundthink.datagen.qc import QCError, evaluate, format_table, summary_path, write_summary
    from groundthink.datagen.runner import PhaseAborted, PhaseInterrupted, RetrySettings, utc_now
    from groundthink.datagen.store import RejectsLog, RunLock, StoreError

    try:
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as exc:  # noqa: BLE001 - omegaconf's MissingMandatoryValue and interpolation errors
        key = getattr(exc, "full_key", None)
        raise UserError(f"{key or 'a config value'} must be set ({type(exc).__name__}: {exc}); e.g. "
                        f"backend.model=NAME for backend=openai, backend.run=RUN for backend=groundthink, "
                        f"prompts.path=FILE for prompts=file") from None
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    # One line per HTTP request from the client libraries would bury the progress lines.
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config["qc"] = effective_qc(config)
    pipeline_kind = config["pipeline"]["kind"]
    if pipeline_kind not in PIPELINES:
        raise UserError(f"pipeline.kind={pipeline_kind!r} is not a pipeline; allowed: {', '.join(PIPELINES)}")
    try:
        retry = RetrySettings(**config["retry"]).validate()
    except (TypeError, ValueError) as exc:
        raise UserError(f"retry: {exc}") from None
    for key in ("concurrency", "shard_size"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise UserError(f"{key}={config[key]!r} must be an integer >= 1")
    if config["count"] is not None and (not isinstance(config["count"], int) or config["count"] < 1):
        raise UserError(f"count={config['count']!r} must be an integer >= 1, or null")
    from groundthink.datagen.qc import METRICS, parse_threshold

    for name, text in config["qc"]["thresholds"].items():
        try:
            if name not in METRICS:
                raise QCError(f"qc.thresholds.{name} (or pipeline.qc.{name}): no such QC metric; the metrics are "
                              f"{', '.join(METRICS)}")
            parse_threshold(name, text)
        except QCError as exc:
            raise UserError(str(exc)) from None
    try:
        prompts = load_prompt_set(config["prompts"])
    except PromptSetError as exc:
        raise UserError(str(exc)) from None

    secrets = _secrets(config)
    lock = RunLock(out_dir).acquire()
    rejects = None
    refused = False  # a UserError before any work: the folder goes again if nothing was written in it
    ctx = None
    try:
        previous = load_manifest(out_dir) or {}
        # The settings part of the recipe first, so a wrong command is refused before a model is loaded.
        check_recipe(previous, recipe(config, (previous.get("recipe") or {}).get("generator") or {}), out_dir, config)
        backend_settings = {k: v for k, v in config["backend"].items() if k != "kind"}
        try:
            backend = build_backend(config["backend"]["kind"], backend_settings, guard=config["guard"])
        except (FatalBackendError, ValueError) as exc:
            raise UserError(str(exc)) from None
        rejects = RejectsLog(out_dir / "rejects.jsonl").open()
        ctx = RunContext(out_dir=out_dir, backend=backend, retry=retry, concurrency=config["concurrency"],
                         shard_size=config["shard_size"], seed=int(config["seed"]), count=config["count"],
                         rejects=rejects, progress_every_s=float(config["progress"]["every_s"]),
                         generator=backend.describe())
        pipeline = PIPELINES[pipeline_kind](config["pipeline"], prompts, ctx)
        try:
            facts = pipeline.prepare()
        except (PipelineError, RequestRejected) as exc:
            raise UserError(str(exc)) from None

        this_recipe = recipe(config, ctx.generator)
        check_recipe(previous, this_recipe, out_dir, config)
        invocations = list(previous.get("invocations") or [])
        for earlier in invocations:
            if earlier.get("status") == "running":
                earlier["status"] = "died"  # it never recorded an end: killed (e.g. SIGKILL) or crashed
        invocation: dict[str, Any] = {"started_utc": utc_now(), "status": "running", "count": config["count"],
                                      "argv": sys.argv[1:]}
        invocations.append(invocation)
        (out_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
        repairs = [rejects.repair.__dict__] if rejects.repair else []
        if rejects.repair:
            print(f"repaired a torn last line in {rejects.repair.path}", file=sys.stderr)

        def manifest(extra: dict[str, Any]) -> None:
            write_manifest(out_dir, {"name": config["name"], "pipeline": pipeline_kind, "recipe": this_recipe,
                                     "generator": ctx.generator, "facts": facts, "config": config,
                                     "invocations": invocations, **extra}, secrets=secrets)

        manifest({"status": "running"})
        print(f"groundthink-datagen {pipeline_kind} -> {out_dir}", file=sys.stderr, flush=True)
        code, phases, message = 0, [], None
        try:
            phases = asyncio.run(_generate(backend, pipeline))
            invocation["status"] = "completed"
        except (PhaseInterrupted, KeyboardInterrupt) as exc:
            invocation["status"] = "interrupted"
            phases = [*ctx.finished, *([exc.stats] if isinstance(exc, PhaseInterrupted) else [])]
            code = 128 + (exc.signum if isinstance(exc, PhaseInterrupted) else signal.SIGINT)
            message = f"interrupted; run the same command again to resume from {out_dir}"
        except PhaseAborted as exc:
            invocation["status"] = "aborted"
            phases = [*ctx.finished, exc.stats]
            code, message = 1, f"stopped: {exc.cause}"
        except FatalBackendError as exc:
            invocation["status"] = "refused"
            code, message = 1, f"stopped before generation: {exc}"
        finally:
            ctx.close()
            rejects.close()
        repairs += [r.__dict__ for s in ctx.stores for r in s.repairs if r.__dict__ not in repairs]
        invocation.update(finished_utc=utc_now(), phases=[p.as_dict() for p in phases], repairs=repairs)

        qc_result = None
        if invocation["status"] == "completed" and config["qc"]["enabled"]:
            try:
                qc_result = evaluate(out_dir, config["qc"])
            except QCError as exc:
                code, message = 1, f"QC could not run: {exc}"
            else:
                write_summary(qc_result, summary_path(out_dir))
                print(format_table(qc_result), file=sys.stderr)
                if qc_result["verdict"] == "FAIL" and config["qc"]["fail_exit"]:
                    code = 1
        guard = backend.guard_report() if hasattr(backend, "guard_report") else None
        manifest({"status": invocation["status"], "guard": guard,
                  "qc": {"verdict": qc_result["verdict"], "failed": qc_result["failed"]} if qc_result else None,
                  "counts": _counts(out_dir)})
        if message:
            print(f"\n{message}", file=sys.stderr)
        print(_closing(out_dir, invocation, qc_result, rejects), file=sys.stderr, flush=True)
        return code
    except StoreError as exc:
        raise UserError(str(exc)) from None
    except UserError:
        refused = True
        raise
    finally:
        if ctx is not None:
            ctx.close()
        if rejects is not None:
            rejects.close()
        if refused:
            _remove_if_unused(out_dir, lock)
        lock.release()


def _remove_if_unused(out_dir: Path, lock) -> None:
    """After a refusal: remove the output folder if it holds nothing but this invocation's empty scaffolding (the
    lock, an empty datagen.log and rejects.jsonl), so a mistyped command leaves no folder behind. A folder with
    anything else in it (earlier records, a manifest, a non-empty log) is left exactly as it is."""
    try:
        entries = list(out_dir.iterdir())
        if any(e.name not in _SCAFFOLDING or not e.is_file() or (e.name != ".lock" and e.stat().st_size)
               for e in entries):
            return
        for entry in entries:
            if entry.name != ".lock":
                entry.unlink(missing_ok=True)
        lock.path.unlink(missing_ok=True)  # still held, so no other writer can be using the folder
        lock.release()  # the caller's release after this is a no-op
        out_dir.rmdir()  # fails, harmlessly, if anything appeared meanwhile
    except OSError:
        pass


async def _generate(backend, pipeline) -> list:
    try:
        await backend.start()
        return await pipeline.run()
    finally:
        await backend.aclose()


def _counts(out_dir: Path) -> dict[str, int]:
    counts = {}
    for sub in ("data", "phases"):
        for path in sorted((out_dir / sub).glob("*.jsonl")):
            stem = path.stem.rsplit("-", 1)[0]
            with open(path, "rb") as f:
                counts[f"{sub}/{stem}"] = counts.get(f"{sub}/{stem}", 0) + sum(1 for _ in f)
    rejects = out_dir / "rejects.jsonl"
    if rejects.exists():
        with open(rejects, "rb") as f:
            counts["rejects_logged"] = sum(1 for _ in f)
    return counts


def _closing(out_dir: Path, invocation: dict[str, Any], qc_result, rejects) -> str:
    lines = [f"=== groundthink-datagen: {invocation['status']} ==="]
    for phase in invocation.get("phases", []):
        lines.append(f"  {phase['phase']:<20} {phase['skipped_done'] + phase['written']}/{phase['total']} done "
                     f"({phase['written']} new, {phase['rejected']} rejected, {phase['retries']} retries, "
                     f"{phase['records_per_s']:.2f} rec/s)")
    if qc_result is not None:
        failed = f" ({', '.join(qc_result['failed'])})" if qc_result["failed"] else ""
        lines.append(f"QC {qc_result['verdict']}{failed}: {out_dir / 'qc_summary.json'}")
    present = [name for name in ("data/", "phases/", "rejects.jsonl", "config.yaml", "manifest.json")
               if (out_dir / name.rstrip("/")).exists()]
    lines.append(f"outputs  {out_dir}  ({', '.join(present)})")
    if rejects is not None and rejects.entries:
        lines.append(f"rejects  {len(rejects.entries)} logged in {rejects.path}; running the same command retries them")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=CONFIG_NAME)
def _hydra_entry(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    global _APP_STARTED
    _APP_STARTED = True
    try:
        code = run(cfg)
    except UserError as exc:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        print(f"\nError: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if code:
        raise SystemExit(code)


# ----------------------------------------------------------------------------------------------------------------
def _default_qc(pipeline: str | None) -> dict[str, Any]:
    import yaml

    root = yaml.safe_load((Path(CONF_DIR) / f"{CONFIG_NAME}.yaml").read_text())
    config: dict[str, Any] = {"qc": root["qc"], "pipeline": {}}
    if pipeline and (Path(CONF_DIR) / "pipeline" / f"{pipeline}.yaml").is_file():
        config["pipeline"] = yaml.safe_load((Path(CONF_DIR) / "pipeline" / f"{pipeline}.yaml").read_text())
    return effective_qc(config)


def _sniff_pipeline(target: Path) -> str | None:
    import json

    with open(target, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                return json.loads(line).get("pipeline")
            except (ValueError, AttributeError):
                continue
    return None


def qc_main(argv: list[str]) -> int:
    """`groundthink-datagen qc <file or run>`: exit 0 PASS, 1 FAIL, 2 input QC cannot judge."""
    import yaml

    from groundthink.datagen.qc import QCError, evaluate, format_table, summary_path, write_summary

    parser = argparse.ArgumentParser(
        prog="groundthink-datagen qc",
        description="Measure a generated dataset against the QC thresholds; writes qc_summary.json, exit 1 on FAIL.")
    parser.add_argument("target", help="a groundthink-datagen run folder, or one chat JSONL file")
    parser.add_argument("--thresholds", help="a YAML file with a `thresholds:` mapping (or the whole qc: section)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=COND",
                        help="override one threshold, e.g. --set 'median_output_tokens=< 40' (null to disable)")
    parser.add_argument("--out", help="where to write the summary (default: <run>/qc_summary.json, or "
                                      "qc_summary.json beside the file)")
    args = parser.parse_args(argv)
    target = Path(args.target)
    try:
        if target.is_dir() and (target / "config.yaml").is_file():
            qc = yaml.safe_load((target / "config.yaml").read_text()).get("qc") or _default_qc(None)
        elif target.is_file():
            qc = _default_qc(_sniff_pipeline(target))
        elif target.is_dir():
            qc = _default_qc(None)
        else:
            raise QCError(f"{target} does not exist; pass a groundthink-datagen run folder or a JSONL file")
        if args.thresholds:
            extra = yaml.safe_load(Path(args.thresholds).read_text()) or {}
            extra = extra.get("qc", extra)
            qc["thresholds"].update(extra.get("thresholds", extra))
        for item in args.set:
            name, sep, cond = item.partition("=")
            if not sep:
                raise QCError(f"--set {item!r}: write NAME=COND, e.g. --set 'runaway_rate=< 0.05'")
            qc["thresholds"][name.strip()] = None if cond.strip() in ("null", "none", "") else cond.strip()
        summary = evaluate(target, qc)
    except (QCError, OSError, yaml.YAMLError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    path = write_summary(summary, summary_path(target, args.out))
    print(format_table(summary))
    print(f"summary: {path}")
    return 1 if summary["verdict"] == "FAIL" else 0


def main() -> None:
    """Console entry point: `qc` goes to the gate; everything else is the Hydra app."""
    argv = sys.argv[1:]
    if argv and argv[0] == "qc":
        raise SystemExit(qc_main(argv[1:]))
    try:
        refuse_secret_overrides(argv)
    except UserError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    try:
        _hydra_entry()
    except SystemExit as exc:
        if exc.code not in (0, None) and not _APP_STARTED:
            _explain_unknown_keys(argv)  # Hydra refused the command line before the app ran
        raise


def _explain_unknown_keys(argv: list[str]) -> None:
    from groundthink.cli_checks import unknown_override_keys

    try:
        unknown = unknown_override_keys(argv, CONF_DIR, config_name=CONFIG_NAME)
    except Exception:  # noqa: BLE001 - hints are best effort; Hydra's own message was already printed
        return
    for key, suggestions in unknown:
        hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        print(f"Unknown config key '{key}'.{hint} (To add a new key on purpose, use +{key}=...)", file=sys.stderr)


if __name__ == "__main__":
    main()
