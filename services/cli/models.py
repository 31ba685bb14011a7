"""`tuneserve models ...`: list and verify the registry's versions; move channels and
pins (promote, rollback, pin, unpin) and run canaries (canary) on the registry itself
or through a running server's Admin API; show a model's rollout history (history).

`list` shows what it cannot read as such and exits 1, listing the rest all the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from services.cli import rollout
from services.cli.common import add_tls_flags, tls_options, token
from services.core.auth import ADMIN_TOKEN_ENV
from services.core.config import DEFAULT_REGISTRY
from services.core.errors import InvalidInput, ModelNotFound, TuneserveError
from services.core.tables import format_table

CHANGES = (("promote", "verify a version, then point a channel at it"),
           ("rollback", "move a channel back to its previous version"),
           ("pin", "make every replica serve this version"),
           ("unpin", "let replicas follow their channel again"))
"""The actions that change what is served, with their help texts."""


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("models", help="inspect the registry")
    actions = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    q = actions.add_parser("list", help="models, versions, channels and metrics")
    q.add_argument("--registry", default=DEFAULT_REGISTRY)
    q.add_argument("--json", action="store_true")
    q.set_defaults(handler=run_list)
    q = actions.add_parser("verify", help="check a version's manifest and checksums")
    q.add_argument("--registry", default=DEFAULT_REGISTRY)
    q.add_argument("name")
    q.add_argument("model_version", metavar="VERSION")
    q.set_defaults(handler=run_verify)
    for action, text in CHANGES:
        _register_change(actions, action, text)
    _register_canary(actions)
    rollout.register_action(actions)
    q = actions.add_parser("history", help="what changed what a model serves, and why")
    q.add_argument("--registry", default=DEFAULT_REGISTRY)
    q.add_argument("--json", action="store_true", help="one JSON object a line")
    q.add_argument("name")
    q.set_defaults(handler=run_history)
    return p


def _add_where_flags(q: argparse.ArgumentParser) -> None:
    """--registry or --address: where a change to a model's versions is made."""
    where = q.add_mutually_exclusive_group()
    where.add_argument("--registry", default=None,
                       help=f"act on the registry directly (default {DEFAULT_REGISTRY})")
    where.add_argument("--address", default=None,
                       help="act through a running server's Admin API: HOST:PORT of its "
                            "admin port (tuneserve serve --admin-port)")


def _add_admin_auth_flags(q: argparse.ArgumentParser) -> None:
    """--token-file and the TLS flags, for a change made through --address."""
    q.add_argument("--token-file", default=None, metavar="FILE",
                   help="with --address: file holding the admin token (default: "
                        "$TUNESERVE_ADMIN_TOKEN)")
    add_tls_flags(q)


def _register_canary(actions) -> None:
    q = actions.add_parser(
        "canary", help="serve a candidate version beside production to a share of traffic",
        description="With VERSION and --percent: start a canary (or change the share of "
                    "the running one); --percent alone: change the share; --promote: "
                    "make the candidate production; --abort: end the canary. With no "
                    "flag: show the running canary.")
    _add_where_flags(q)
    q.add_argument("name")
    q.add_argument("model_version", metavar="VERSION", nargs="?", default=None)
    what = q.add_mutually_exclusive_group()
    what.add_argument("--percent", default=None, metavar="N",
                      help="the candidate's share of the requests, 0 to 100")
    what.add_argument("--promote", action="store_true",
                      help="point production at the candidate and end the canary")
    what.add_argument("--abort", action="store_true",
                      help="end the canary: production answers every request")
    q.add_argument("--reason", default="", help="why, for the history")
    _add_admin_auth_flags(q)
    q.set_defaults(handler=run_canary)


def _register_change(actions, action: str, text: str) -> None:
    q = actions.add_parser(action, help=text)
    _add_where_flags(q)
    q.add_argument("name")
    if action in ("promote", "pin"):
        q.add_argument("model_version", metavar="VERSION")
    if action in ("promote", "rollback"):
        q.add_argument("--channel", default="production")
    _add_admin_auth_flags(q)
    q.set_defaults(handler=run_change)


# ---- list and verify -----------------------------------------------------------------
def run_verify(args: argparse.Namespace) -> int:
    manifest = existing_registry(args.registry).verify(args.name, args.model_version)
    print(f"{args.name} {args.model_version}: OK ({len(manifest['files'])} files verified)")
    return 0


def run_list(args: argparse.Namespace) -> int:
    data = registry_rows(existing_registry(args.registry))
    if args.json:
        for row in data:
            print(json.dumps(row))
    elif not data:
        print(f"no models in {args.registry}")
    else:
        rows = [(d["name"], d["version"], d["task"] or "-",
                 ",".join([*d["channels"], *(["pin"] if d["pinned"] else []),
                           *([f"canary {d['canary_percent']:g}%"]
                             if d.get("canary_percent") is not None else [])]) or "-",
                 headline_metric(d["metrics"]) if not d.get("error") else
                 f"unreadable: {d['error']}", d["created_at"] or "-") for d in data]
        print(format_table(rows, ["model", "version", "task", "channels", "eval", "created"]))
    return 1 if any(d.get("error") for d in data) else 0


def registry_rows(reg) -> list[dict[str, Any]]:
    """One row per version. A version, channel or pin that cannot be read is shown as
    such (`error`), and the rest are listed all the same."""
    data: list[dict[str, Any]] = []
    for name in reg.model_names():
        problems: list[str] = []
        try:
            channels = reg.channels_of(name)
        except TuneserveError as exc:
            channels, problems = {}, [exc.message]
        try:
            pinned = reg.pinned(name)
        except TuneserveError as exc:
            pinned, problems = None, [*problems, exc.message]
        try:
            canary = reg.canary(name) or {}
        except TuneserveError as exc:
            canary, problems = {}, [*problems, exc.message]
        for version in reg.versions(name):
            row: dict[str, Any] = {
                "name": name, "version": version, "task": None,
                "channels": [c for c, v in channels.items() if v == version],
                "pinned": version == pinned, "metrics": {}, "created_at": None}
            if canary.get("version") == version:
                row["canary_percent"] = canary["percent"]
            _read_manifest(reg, row)
            if problems and not row.get("error"):
                row["error"] = "; ".join(problems)
            data.append(row)
    return data


def _read_manifest(reg, row: dict[str, Any]) -> None:
    try:
        m = reg.manifest(row["name"], row["version"])
    except TuneserveError as exc:
        row["error"] = exc.message
    else:
        metrics = m.get("metrics")
        row.update(task=m.get("task"), created_at=m.get("created_at"),
                   metrics=metrics if isinstance(metrics, dict) else {})


def existing_registry(location: str):
    """The registry at `location`; a local one must be a folder that exists."""
    from services.core.registry import Registry

    reg = Registry(location)
    root = Path(reg.backend.root)
    if not reg.backend.remote and not root.is_dir():
        why = "a file, not a folder" if root.exists() else "no such folder"
        raise InvalidInput(f"--registry: no registry at {location} ({why})")
    return reg


def headline_metric(metrics: dict) -> str:
    """A classifier's accuracy, a generator's perplexity, from a manifest's metrics."""
    for key, fmt in (("accuracy", ".4f"), ("perplexity", ".3f"), ("loss", ".4f")):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{key} {value:{fmt}}"
    return "-"


# ---- promote, rollback, pin, unpin ---------------------------------------------------
def run_change(args: argparse.Namespace) -> int:
    """promote / rollback / pin / unpin, on the registry or through the Admin API."""
    action = args.models_command
    version = getattr(args, "model_version", None)
    channel = getattr(args, "channel", "production")
    check_admin_flags(args)
    if args.address:
        before, now = _change_through_admin(args, action, version, channel)
    else:
        reg = existing_registry(args.registry or DEFAULT_REGISTRY)
        before, now = _change_in_registry(reg, args.name, action, version, channel)
    target = channel if action in ("promote", "rollback") else "pin"
    print(f"{args.name} {target}: {before or '-'} -> {now or '-'}")
    if action in ("promote", "rollback") and not args.address:
        pinned = reg.pinned_or_unreadable(args.name)
        if pinned:
            print(f"note: {args.name} is pinned to {pinned}: replicas serve it until "
                  f"`tuneserve models unpin {args.name}`", file=sys.stderr)
    return 0


def check_admin_flags(args: argparse.Namespace) -> None:
    """--token-file and the TLS flags go with --address only."""
    if args.token_file and not args.address:
        raise InvalidInput("--token-file: only with --address (the Admin API)")
    tls = [flag for flag, value in tls_options(args).items() if value]
    if tls and not args.address:
        raise InvalidInput(f"--{tls[0].replace('_', '-')}: only with --address (the Admin API)")


def _change_through_admin(args: argparse.Namespace, action: str, version: Optional[str],
                          channel: str) -> tuple[str, str]:
    """(before, now) of a change made by the server's Admin API."""
    from services.client import Client

    with Client(args.address, admin_token=token(args.token_file, ADMIN_TOKEN_ENV),
                **tls_options(args)) as client:
        call = {"promote": lambda: client.promote(args.name, version, channel),
                "rollback": lambda: client.rollback(args.name, channel),
                "pin": lambda: client.pin(args.name, version),
                "unpin": lambda: client.unpin(args.name)}[action]
        resp = call()
    return resp.previous_version, resp.version


def _change_in_registry(reg, name: str, action: str, version: Optional[str],
                        channel: str) -> tuple[Optional[str], Optional[str]]:
    """(before, now) of a change made on the registry; promote and pin verify first."""
    if action == "promote":
        before = reg.channel(name, channel)
        reg.verify(name, version)
        reg.set_channel(name, channel, version)
        return before, version
    if action == "rollback":
        before = reg.channel(name, channel)
        return before, reg.rollback(name, channel)
    before = reg.pinned_or_unreadable(name)
    if action == "pin":
        reg.verify(name, version)
        reg.pin(name, version)
        return before, version
    reg.unpin(name)
    return before, ""


# ---- canary and history --------------------------------------------------------------
def describe_canary(name: str, state: Optional[dict[str, Any]]) -> str:
    if not state:
        return f"{name}: no canary running"
    return (f"{name} canary: {state['version']} at {state['percent']:g} % beside production "
            f"{state.get('production') or '-'} (step {state.get('step', 0)}, since "
            f"{state.get('started_at') or '-'})")


def run_canary(args: argparse.Namespace) -> int:
    from services.core.registry import canary_percent

    check_admin_flags(args)
    percent = None if args.percent is None else canary_percent(args.percent, "--percent")
    if args.address:
        return _canary_through_admin(args, percent)
    reg = existing_registry(args.registry or DEFAULT_REGISTRY)
    name, version = args.name, args.model_version
    running = reg.canary(name)
    if version and running and (args.promote or args.abort) and \
            running["version"] != version:
        raise InvalidInput(f"VERSION: the candidate of {name} is {running['version']}, "
                           f"not {version}")
    if args.promote:
        state = reg.promote_canary(name, args.reason)
        print(f"{name} production: {state['previous'] or '-'} -> {state['version']} "
              "(canary promoted)")
    elif args.abort:
        state = reg.abort_canary(name, args.reason)
        print(f"{name} canary: {state['version']} aborted; production "
              f"{reg.channel(name) or '-'} answers every request")
    elif percent is None:
        if version:
            raise InvalidInput(f"--percent: required to start a canary of {name} {version}")
        print(describe_canary(name, running))
    elif version is None or (running and running["version"] == version):
        state = reg.set_canary_share(name, percent, args.reason)
        print(f"{name} canary: {state['version']} at "
              f"{running['percent'] if running else 0:g} % -> {percent:g} %")
    else:
        reg.verify(name, version)
        state = reg.start_canary(name, version, percent, args.reason)
        print(describe_canary(name, state))
    return 0


def _canary_through_admin(args: argparse.Namespace, percent: Optional[float]) -> int:
    """run_canary through the Admin API: VERSION with --percent starts a canary,
    --percent alone changes its share."""
    from services.client import Client

    name, version, reason = args.name, args.model_version, args.reason
    if not (args.promote or args.abort or percent is not None):
        raise InvalidInput("--address: give --percent, --promote or --abort (the running "
                           "canary shows in `tuneserve models list` or ListModels)")
    with Client(args.address, admin_token=token(args.token_file, ADMIN_TOKEN_ENV),
                **tls_options(args)) as client:
        if args.promote:
            resp = client.promote_canary(name, reason)
        elif args.abort:
            resp = client.abort_canary(name, reason)
        elif version:
            resp = client.start_canary(name, version, percent, reason)
        else:
            resp = client.set_canary_share(name, percent, reason)
    print(f"{name} canary: {resp.candidate_version} at {resp.previous_percent:g} % -> "
          f"{resp.percent:g} %; production {resp.production_version or '-'}")
    return 0


HISTORY_FIELDS = ("version", "channel", "previous", "production", "percent")


def run_history(args: argparse.Namespace) -> int:
    reg = existing_registry(args.registry)
    if not reg.exists(args.name):
        raise ModelNotFound(f"model '{args.name}' not found in {args.registry}")
    entries = reg.history(args.name)
    if args.json:
        for entry in entries:
            print(json.dumps(entry, sort_keys=True))
        return 0
    if not entries:
        print(f"{args.name}: no history yet")
        return 0
    rows = [(e.get("time", "-"), e.get("action", "-"), _history_details(e),
             e.get("reason") or "-") for e in entries]
    print(format_table(rows, ["time", "action", "details", "reason"]))
    return 0


def _history_details(entry: dict[str, Any]) -> str:
    """The entry's fields but time, action and reason, the usual ones first."""
    shown = [k for k in HISTORY_FIELDS if entry.get(k) is not None]
    shown += sorted(k for k in entry if k not in (*HISTORY_FIELDS, "time", "action", "reason")
                    and entry[k] is not None)
    return " ".join(f"{k}={entry[k]:g}" if isinstance(entry[k], float) else
                    f"{k}={entry[k]}" for k in shown) or "-"
