"""Canary state and the rollout history of a model, kept in the registry.

    <root>/<name>/canary.json     {"version": "v3", "percent": 10.0, "production": "v2",
                                   "step": 0, "started_at": ..., "updated_at": ...}
    <root>/<name>/history.jsonl   one JSON object a line, oldest first: what changed what
                                  is served (canary start, share, promote, abort; channel
                                  moves, pins), when, with its numbers and reason

The canary pointer is replaced whole, like the channel pointers (readers see the old
state or the new one; on an object store by a conditional write, so no concurrent
change is lost or overwritten unseen), so every replica on every node agrees on the
candidate and its share. A cleared canary keeps the file with `"version": null`. A canary splits the
traffic of the `production` channel only; a pin (registry or serving config) overrides
it. The history is append-only; on an object store it is rewritten whole (a
conditional write, so concurrent entries are all kept) and keeps its newest
HISTORY_KEEP_BYTES.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from typing import Any, Callable, Optional

from services.core.errors import InvalidInput, ModelNotFound, RegistryError
from services.core.names import VERSION_RE, validate_name, validate_version

CANARY_FILE = "canary.json"
HISTORY_FILE = "history.jsonl"
CANARY_CHANNEL = "production"
HISTORY_KEEP_BYTES = 4 * 1024 * 1024
"""What `history` reads at most (its newest entries), and an object store keeps."""
REASON_CHARS = 500


def stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def canary_percent(value: Any, flag: str = "percent") -> float:
    """A traffic share in percent: a number from 0 to 100."""
    try:
        percent = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{flag}: expected a number from 0 to 100, got "
                           f"{str(value)[:32]!r}") from None
    if isinstance(value, bool) or not math.isfinite(percent) or not 0 <= percent <= 100:
        raise InvalidInput(f"{flag}: expected a number from 0 to 100, got {value!r}")
    return percent


def active_canary(state: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The canary a pointer describes ({"version", "percent", ...}), or None: none,
    cleared, or a hand-edited file that names no version or a share out of range."""
    version = state.get("version")
    if not isinstance(version, str) or not VERSION_RE.match(version):
        return None
    try:
        percent = canary_percent(state.get("percent"))
    except InvalidInput:
        return None
    step = state.get("step")
    return {**state, "version": version, "percent": percent,
            "step": step if isinstance(step, int) and not isinstance(step, bool) else 0}


def _reason(reason: str) -> str:
    return str(reason or "")[:REASON_CHARS]


class RolloutMethods:
    """Mixed into Registry: canary state and history, under the model's lock."""

    # ---- reading -------------------------------------------------------------------
    def canary_state(self, name: str) -> dict[str, Any]:
        """The canary pointer as written ({} when there is none)."""
        return self._pointer(f"{validate_name(name)}/{CANARY_FILE}", f"{name} canary")

    def canary(self, name: str) -> Optional[dict[str, Any]]:
        """The running canary of a model ({"version", "percent", "step", ...}) or None."""
        return active_canary(self.canary_state(name))

    def history(self, name: str) -> list[dict[str, Any]]:
        """The model's rollout history, oldest first (the newest HISTORY_KEEP_BYTES);
        a line that is not a JSON object is skipped."""
        rel = f"{validate_name(name)}/{HISTORY_FILE}"
        if self.backend.is_symlink(rel):
            raise RegistryError(f"{name} history is a symlink; refusing to follow it")
        if not self.backend.is_file(rel):
            return []
        data = self.backend.read_tail(rel, HISTORY_KEEP_BYTES)
        entries = []
        for line in data.splitlines():
            try:
                entry = json.loads(line)
            except (ValueError, RecursionError):  # the line cut by the tail read, say
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    # ---- writing -------------------------------------------------------------------
    def record(self, name: str, action: str, reason: str = "", **fields: Any) -> dict:
        """Append one decision to the model's history: time, action, its numbers
        (`fields`, JSON-serialisable) and why."""
        entry = {"time": stamp(), "action": action, **fields, "reason": _reason(reason)}
        line = json.dumps(entry, sort_keys=True, default=str).encode() + b"\n"
        self.backend.append(f"{validate_name(name)}/{HISTORY_FILE}", line,
                            HISTORY_KEEP_BYTES)
        return entry

    def _change_canary(self, name: str, change: Callable[[dict[str, Any]], dict[str, Any]],
                       then: Callable[[dict[str, Any]], Any]) -> Any:
        """Replace the canary pointer with change(its current state), which raises to
        refuse, then run then(new state) (the history entry, the channel move): under
        the model's lock on a filesystem; on an object store as a conditional write
        (If-Match, `change` run again on the fresh state when another writer got in
        first), `then` once it won. Returns what `then` returns."""
        rel = f"{name}/{CANARY_FILE}"
        if not self.backend.remote:
            with self.backend.lock(f"{name}/.lock"):
                new = change(self.canary_state(name))
                self.backend.write_atomic(rel, json.dumps(new, indent=2,
                                                          sort_keys=True).encode())
                return then(new)
        new = self._update_pointer(name, rel, f"{name} canary", change)
        return then(new)

    def start_canary(self, name: str, version: str, percent: float,
                     reason: str = "") -> dict[str, Any]:
        """Make `version` the candidate beside production, with `percent` of the traffic.
        The caller verifies the version first (as for a promote)."""
        validate_name(name), validate_version(version)
        percent = canary_percent(percent)
        if not self.exists(name, version):
            raise ModelNotFound(f"model '{name}' has no version '{version}'")
        self.check_task(name, version)

        def start(current: dict[str, Any]) -> dict[str, Any]:
            production = self.channel(name, CANARY_CHANNEL)
            if production is None:
                raise RegistryError(f"model '{name}' has no production version to compare "
                                    "a canary with: promote one first")
            if production == version:
                raise RegistryError(f"{name} {version} is production already")
            pinned = self.pinned(name)
            if pinned:
                raise RegistryError(f"{name} is pinned to {pinned}, which every replica "
                                    f"serves: `tuneserve models unpin {name}` first")
            running = active_canary(current)
            if running is not None:
                raise RegistryError(
                    f"{name} has a canary running ({running['version']} at "
                    f"{running['percent']:g} %): change its share, promote or abort it")
            now = stamp()
            return {"version": version, "percent": percent, "production": production,
                    "step": 0, "started_at": now, "updated_at": now}

        def recorded(state: dict[str, Any]) -> dict[str, Any]:
            self.record(name, "canary-start", reason, version=version, percent=percent,
                        production=state["production"], step=0)
            return state

        return self._change_canary(name, start, recorded)

    def _running(self, name: str, state: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        running = active_canary(self.canary_state(name) if state is None else state)
        if running is None:
            if not self.exists(name):
                raise ModelNotFound(f"model '{name}' not found in the registry")
            raise RegistryError(f"{name} has no canary running: start one with "
                                f"`tuneserve models canary {name} VERSION --percent N`")
        return running

    def set_canary_share(self, name: str, percent: float, reason: str = "",
                         step: Optional[int] = None, **numbers: Any) -> dict[str, Any]:
        """Change the running canary's share (and its rollout step, if given); `numbers`
        go into the history entry (an analysis's measurements)."""
        validate_name(name)
        percent = canary_percent(percent)
        previous: list[float] = []

        def share(current: dict[str, Any]) -> dict[str, Any]:
            state = self._running(name, current)
            previous[:] = [state["percent"]]
            state.update(percent=percent, updated_at=stamp(),
                         step=state["step"] if step is None else int(step))
            return state

        def recorded(state: dict[str, Any]) -> dict[str, Any]:
            self.record(name, "canary-share", reason, version=state["version"],
                        percent=percent, previous_percent=previous[0],
                        production=self.channel(name, CANARY_CHANNEL), step=state["step"],
                        **numbers)
            return state

        return self._change_canary(name, share, recorded)

    def promote_canary(self, name: str, reason: str = "", **numbers: Any) -> dict[str, Any]:
        """Point production at the candidate and end the canary. Returns the ended
        canary's state with `previous` (production before). Production moves first,
        so a replica never sees the canary ended with production not yet moved (it
        would drop the candidate it holds and load it again)."""
        validate_name(name)
        ended: list[dict[str, Any]] = []
        previous: list[Optional[str]] = []

        def end(current: dict[str, Any]) -> dict[str, Any]:
            state = self._running(name, current)
            version = state["version"]
            if not self.exists(name, version):
                raise ModelNotFound(f"model '{name}' has no version '{version}'")
            ended[:] = [state]
            before = self.channel_state(name, CANARY_CHANNEL)
            if before.get("version") != version:  # not yet moved by an earlier try
                self._write_channel(name, CANARY_CHANNEL, version, before)
                previous[:] = [before.get("version")]
            return _ended(state, "promote")

        def recorded(_: dict[str, Any]) -> dict[str, Any]:
            state = ended[0]
            before = previous[0] if previous else None
            self.record(name, "canary-promote", reason, version=state["version"],
                        production=state["version"], previous=before,
                        percent=state["percent"], step=state["step"], **numbers)
            return {**state, "previous": before}

        return self._change_canary(name, end, recorded)

    def abort_canary(self, name: str, reason: str = "", **numbers: Any) -> dict[str, Any]:
        """End the canary: every request goes to production again. Returns its state."""
        validate_name(name)
        ended: list[dict[str, Any]] = []

        def end(current: dict[str, Any]) -> dict[str, Any]:
            ended[:] = [self._running(name, current)]
            return _ended(ended[0], "abort")

        def recorded(_: dict[str, Any]) -> dict[str, Any]:
            state = ended[0]
            self.record(name, "canary-abort", reason, version=state["version"],
                        production=self.channel(name, CANARY_CHANNEL),
                        percent=state["percent"], step=state["step"], **numbers)
            return state

        return self._change_canary(name, end, recorded)


def _ended(state: dict[str, Any], how: str) -> dict[str, Any]:
    """The pointer of a canary that ended (cleared: `"version": null`)."""
    return {"version": None, "percent": 0.0, "updated_at": stamp(),
            "ended": {"version": state["version"], "how": how}}
