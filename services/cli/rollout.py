"""`tuneserve models rollout`: a canary stepped up to production, or rolled back, by
its own serving metrics (services/rollout.py). Registered under `models`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.core.analysis import RolloutPolicy
from services.core.config import CLASSIFICATION, DEFAULT_REGISTRY
from services.core.errors import InvalidInput
from services.rollout import AccuracyCheck, Rollout, metrics_reader

DEFAULTS = RolloutPolicy()


def register_action(actions) -> None:
    q = actions.add_parser(
        "rollout", help="canary a version step by step; promote it or roll it back by "
                        "its error ratio and p99 latency against production's",
        description="Starts VERSION as a canary at the first of --steps, reads the "
                    "serving metrics from --metrics-url (Ray's metrics endpoint of each "
                    "node) and at each step compares the candidate's server-side error "
                    "ratio and p99 latency with production's over the same window. A "
                    "failing check aborts the canary at once; passing every step "
                    "promotes it. Each decision goes into `tuneserve models history`. The step "
                    "is kept in the registry's canary state: run on a version whose "
                    "canary is running (an interrupted rollout), it resumes at that "
                    "step.")
    q.add_argument("--registry", default=DEFAULT_REGISTRY)
    q.add_argument("name")
    q.add_argument("model_version", metavar="VERSION")
    q.add_argument("--metrics-url", action="append", required=True, metavar="URL",
                   help="a Ray node's metrics endpoint, http://HOST:PORT/metrics "
                        "(repeat it for every node that serves)")
    q.add_argument("--steps", default=",".join(f"{s:g}" for s in DEFAULTS.steps),
                   help="the candidate's share at each step, in percent (then 100 %%)")
    q.add_argument("--min-requests", type=int, default=DEFAULTS.min_requests,
                   help="the candidate's requests in a step before it is judged")
    q.add_argument("--min-step-s", type=float, default=DEFAULTS.min_step_s,
                   help="the shortest time a step lasts")
    q.add_argument("--max-step-s", type=float, default=DEFAULTS.max_step_s,
                   help="a step without --min-requests in this long rolls back")
    q.add_argument("--poll-s", type=float, default=DEFAULTS.poll_s,
                   help="how often the metrics are read")
    q.add_argument("--p99-factor", type=float, default=DEFAULTS.p99_factor,
                   help="a step fails when the candidate's p99 latency is above this "
                        "times production's plus --p99-slack-s")
    q.add_argument("--p99-slack-s", type=float, default=DEFAULTS.p99_slack_s,
                   help="seconds added to production's p99 in the latency check")
    q.add_argument("--analysis-data", default=None, metavar="FILE",
                   help="labelled rows (CSV/TSV/JSONL, as for `tuneserve eval`): a "
                        "classifier's candidate must be as accurate as production on "
                        "them, scored in the background while the steps run")
    q.add_argument("--json", action="store_true", help="print the outcome as JSON")
    q.set_defaults(handler=run)


def policy_from(args: argparse.Namespace) -> RolloutPolicy:
    try:
        steps = tuple(float(s) for s in args.steps.split(","))
    except ValueError:
        raise InvalidInput(f"--steps: expected shares like 5,25,50, got {args.steps!r}") \
            from None
    try:
        return RolloutPolicy(steps=steps, min_requests=args.min_requests,
                             min_step_s=args.min_step_s, max_step_s=args.max_step_s,
                             poll_s=args.poll_s, p99_factor=args.p99_factor,
                             p99_slack_s=args.p99_slack_s)
    except ValueError as exc:  # "<field>: what it expects"
        field, _, expected = str(exc).partition(": ")
        raise InvalidInput(f"--{field.replace('_', '-')}: {expected}") from None


def accuracy_check(args: argparse.Namespace, reg) -> AccuracyCheck:
    """--analysis-data read and checked now; each version scored as `tuneserve eval`
    scores it (verified, loaded, run through the serving runtime)."""
    from services.evaluate import evaluate_local, read_data

    task = reg.task(args.name, args.model_version)
    if task != CLASSIFICATION:
        raise InvalidInput(f"--analysis-data: {args.name} is a {task} model; the accuracy "
                           "check is for classifiers")
    data = read_data(args.analysis_data)

    def score(version: str) -> float:
        report = evaluate_local(args.registry, args.name, version, data, progress=False)
        return float(report.metrics["accuracy"])

    return AccuracyCheck(score, len(data.texts), args.analysis_data)


def run(args: argparse.Namespace) -> int:
    from services.core.registry import Registry

    policy = policy_from(args)
    read = metrics_reader(args.metrics_url)
    reg = Registry(args.registry)
    if not reg.backend.remote and not Path(reg.backend.root).is_dir():
        raise InvalidInput(f"--registry: no registry at {args.registry}")
    reg.verify(args.name, args.model_version)
    read()  # an endpoint that cannot be read fails here, before the canary starts
    accuracy = accuracy_check(args, reg) if args.analysis_data else None
    out = (lambda line: None) if args.json else print
    try:
        outcome = Rollout(reg, args.name, args.model_version, read, policy, out=out,
                          accuracy=accuracy).run()
    except KeyboardInterrupt:
        print(f"interrupted: the canary of {args.model_version} keeps its share and "
              "step; run this command again to resume the rollout there, or end it with "
              f"`tuneserve models canary --registry {args.registry} {args.name} --abort` "
              "(or --promote)")
        return 130
    if args.json:
        print(json.dumps({"promoted": outcome.promoted, "reason": outcome.reason,
                          "steps": outcome.steps}, sort_keys=True))
    return 0 if outcome.promoted else 1
