"""`tuneserve train`: fine-tune a model (Ray Train) and publish it to the registry.

Flags mirror TrainConfig's fields and override --config's; --resume continues a run
with the config it started with. Training itself is imported in `run` only.

With --rollout canary the published version then goes through the stepped canary
rollout `tuneserve models rollout` runs (services/rollout.py) and the exit status says
how it ended: 0 promoted, ROLLED_BACK rolled back (the summary and the model's history
say why).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from typing import Any, Optional

from services.core.config import TrainConfig, field_help, rollout_policy, template_from_flag
from services.core.errors import ConfigError, TuneserveError
from services.core.tables import format_table
from services.training.tracking import epoch_rows

TRAIN_FLAG_SKIP = {"extra"}
"""TrainConfig fields that have no flag."""

ROLLED_BACK = 3
"""Exit status of a run whose --rollout canary rolled the new version back."""

EPOCH_COLUMNS = ("loss", "accuracy", "macro_f1", "perplexity")
"""The per-epoch columns, in this order, where the task has them (all are in the
manifest)."""


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="fine-tune a model and publish it to the registry")
    p.add_argument("--config", help="YAML run config; flags override its fields")
    add_config_flags(p)
    p.add_argument("--no-publish", action="store_true", help="train and evaluate only")
    p.add_argument("--promote-anyway", action="store_true",
                   help="make the published version production even if it is no better "
                        "than the majority-class baseline or the production version")
    p.add_argument("--resume", metavar="RUN", default=None,
                   help="continue an interrupted run (its name in --runs-dir, or its folder) "
                        "from its last checkpoint, with the config it started with")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=run)
    return p


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, typed by the field; None = not given."""
    helps = field_help(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in TRAIN_FLAG_SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        text = helps.get(f.name, "")
        if default not in (None, False, [], {}):
            text += f" (default: {default})"
        hint = str(f.type)
        if "bool" in hint and "Optional" in hint:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=None, help=text)
        elif "bool" in hint:
            p.add_argument(flag, dest=f.name, action="store_true", default=None, help=text)
        elif "float" in hint:
            p.add_argument(flag, dest=f.name, type=float, default=None, help=text, metavar="X")
        elif "int" in hint:
            p.add_argument(flag, dest=f.name, type=int, default=None, help=text, metavar="N")
        else:
            p.add_argument(flag, dest=f.name, default=None, help=text,
                           metavar="A,B" if "list" in hint else "VALUE")


def run(args: argparse.Namespace) -> int:
    from services.training.run import resume_config, run_training

    cfg = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if f.name not in TRAIN_FLAG_SKIP}
    if args.prompt_template:
        overrides["prompt_template"] = template_from_flag(args.prompt_template)
    if args.resume:
        check_resume_flags(overrides, args.config)
        cfg = resume_config(args.resume, overrides.get("runs_dir"), overrides.get("address"))
    else:
        cfg = cfg.merged(overrides)
    if args.promote_anyway and args.no_publish:
        raise ConfigError("--promote-anyway promotes what is published: drop --no-publish")
    if cfg.rollout and (args.no_publish or args.promote_anyway):
        flag = "--no-publish" if args.no_publish else "--promote-anyway"
        raise ConfigError(f"invalid config field 'rollout': --rollout {cfg.rollout} rolls "
                          f"out what is published, and {flag} does not let it: drop one")
    if cfg.rollout:
        cfg = cfg.resolve()  # a bad rollout_* field fails here, before training
    result = run_training(cfg, publish=not args.no_publish, verbose=args.verbose,
                          resume=args.resume, promote=True if args.promote_anyway else None)
    summary = {"name": result.name, "version": result.version, "promoted": result.promoted,
               "metrics": result.metrics, "registry": result.registry,
               "checkpoint": result.checkpoint_dir, "run_dir": result.run_dir,
               "wall_s": round(result.wall_s, 1),
               "publish_s": None if result.publish_s is None else round(result.publish_s, 2),
               "samples_per_s": result.samples_per_s, "promotion": result.promotion,
               "epochs": epoch_rows(result.history), "best_epoch": result.best_epoch,
               "artifacts": result.artifacts, "rollout": None}
    if not result.canary_ready:
        print(json.dumps(summary) if args.json else format_summary(summary))
        return 0
    if not args.json:
        print(format_summary(summary), flush=True)
    summary["rollout"] = roll_out(cfg, result, out=(lambda line: None) if args.json
                                  else lambda line: print(line, flush=True))
    summary["promoted"] = summary["rollout"]["promoted"]
    if args.json:
        print(json.dumps(summary))
    return 0 if summary["promoted"] else ROLLED_BACK


def roll_out(cfg, result, out) -> dict[str, Any]:
    """The published version's canary rollout under the run's policy (rollout_*
    fields): {"promoted", "reason", "steps"}. An error that stops it says what was
    published and how to roll it out again."""
    from services.core.registry import Registry
    from services.rollout import Rollout, metrics_reader

    registry = Registry(result.registry)
    urls = list(cfg.rollout_metrics_url)
    read = metrics_reader(urls)
    out(f"rolling out {result.name} {result.version} as a canary")
    try:
        read()  # an endpoint that cannot be read fails here, before the canary starts
        outcome = Rollout(registry, result.name, result.version, read, rollout_policy(cfg),
                          out=out).run()
    except TuneserveError as exc:
        again = " ".join(["tuneserve models rollout", "--registry",
                          shlex.quote(result.registry), result.name, result.version,
                          *(f"--metrics-url {shlex.quote(u)}" for u in urls)])
        raise type(exc)(f"{result.name} {result.version} is published but its rollout "
                        f"stopped: {exc.message}. Roll it out again with `{again}`") \
            from None
    return {"promoted": outcome.promoted, "reason": outcome.reason,
            "steps": outcome.steps}


def check_resume_flags(overrides: dict[str, Any], config: Optional[str]) -> None:
    """--resume takes the run's own config: no --config, no field flags but where the
    run lives (--runs-dir) and the cluster (--address)."""
    given = sorted(k for k, v in overrides.items()
                   if v is not None and k not in ("runs_dir", "address"))
    if given or config:
        drop = ", ".join("--" + g.replace("_", "-") for g in given) or "--config"
        raise ConfigError(f"--resume continues a run with the config it started with; "
                          f"drop {drop}")


def format_summary(s: dict[str, Any]) -> str:
    """The summary `tuneserve train` prints: per-epoch table, what was published, where
    the artifacts are."""
    lines = _epoch_lines(s)
    if s["version"]:
        lines.append(f"published {s['name']} {s['version']}"
                     + (" (production)" if s["promoted"] else "")
                     + f" -> {s['checkpoint']}"
                     + (f" in {s['publish_s']}s" if s.get("publish_s") is not None else ""))
        lines.append(f"serve it:  tuneserve serve --registry {shlex.quote(s['registry'])} "
                     "--grpc-port 9000")
    else:
        lines.append(f"best checkpoint (not published): {s['checkpoint']}")
    if s.get("promotion"):
        lines.append(s["promotion"])
    artifacts = s.get("artifacts") or {}
    if "plot" in artifacts:
        lines.append(f"curves:    {artifacts['plot']}")
    if "tensorboard" in artifacts:
        lines.append(f"tensorboard --logdir {artifacts['tensorboard']}")
    lines.append(f"wall time {s['wall_s']}s")
    return "\n".join(lines)


def _epoch_lines(s: dict[str, Any]) -> list[str]:
    epochs = s.get("epochs") or []
    if not epochs:
        rows = [(k, f"{v:.4f}") for k, v in s["metrics"].items()]
        return ["", format_table(rows, ["metric", "value"]), ""]
    cols = [c for c in EPOCH_COLUMNS if any(c in r for r in epochs)]
    rows = [[f"{r['epoch']}{' *' if r['epoch'] == s.get('best_epoch') else ''}",
             r["step"], _fmt(r.get("train_loss")), *(_fmt(r.get(c)) for c in cols)]
            for r in epochs]
    header = ["epoch", "step", "train loss", *(f"eval {c}" for c in cols)]
    best = ", ".join(f"{k} {v:.4f}" for k, v in s["metrics"].items())
    return ["", format_table(rows, header), "",
            f"published epoch {s.get('best_epoch') or '?'} (*): {best}"]


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"
