"""The status board: which version every model replica actually serves, and the
change notices that tell replicas to read the registry now.

Each model replica reports its state here after every registry poll and after every
swap; the ingress reads it for health checks and ListModels. An entry that has not been
refreshed for a while belongs to a replica that is gone (scaled down or dead) and is
dropped. One tiny replica, no CPUs reserved.

Change notices: the Admin methods call `notify(model)` after they move a model's
channel, pin or canary, and every replica of the model holds a long poll
(`wait_change`) that returns when the model's change count moves, so the replicas read
the registry at once rather than at their next poll (services/serving/follower.py).
The count is tagged with this board's start, so a board restarted (counts from zero
again) still reads as a change. Each replica holds one call open here at a time.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Optional

from services.serving.waiting import wait_event

STALE_AFTER_S = 15.0
MAX_WAIT_S = 30.0
"""The longest a `wait_change` call is held before it answers "no change"."""


class StatusBoard:
    def __init__(self, stale_after_s: float = STALE_AFTER_S):
        self.stale_after_s = stale_after_s
        self._entries: dict[tuple[str, str], tuple[dict[str, Any], float]] = {}
        self._started = uuid.uuid4().hex[:12]
        self._changes: dict[str, int] = {}  # model -> notices so far
        self._waiters: dict[str, asyncio.Event] = {}  # model -> set at its next notice

    def report(self, status: dict[str, Any], stale_after_s: float | None = None) -> None:
        key = (status["name"], status["replica"])
        self._entries[key] = (status, time.monotonic() + (stale_after_s or self.stale_after_s))

    def forget(self, name: str, replica: str) -> None:
        self._entries.pop((name, replica), None)

    def get(self) -> dict[str, list[dict[str, Any]]]:
        """model name -> live replica statuses, sorted by replica id."""
        now = time.monotonic()
        out: dict[str, list[dict[str, Any]]] = {}
        for key, (status, expires) in list(self._entries.items()):
            if expires < now:
                del self._entries[key]
                continue
            out.setdefault(key[0], []).append(status)
        for statuses in out.values():
            statuses.sort(key=lambda s: s["replica"])
        return out

    def _mark(self, name: str) -> str:
        return f"{self._started}:{self._changes.get(name, 0)}"

    async def notify(self, name: str) -> str:
        """The registry entries of `name` changed: wake its replicas' `wait_change`."""
        self._changes[name] = self._changes.get(name, 0) + 1
        waiters = self._waiters.pop(name, None)
        if waiters is not None:
            waiters.set()
        return self._mark(name)

    async def wait_change(self, name: str, seen: Optional[str],
                          timeout_s: float = MAX_WAIT_S) -> str:
        """The change mark of `name` once it differs from `seen` (at once when it does
        already, e.g. `seen` None), or the unchanged mark after timeout_s (at most
        MAX_WAIT_S)."""
        if self._mark(name) == seen:
            waiters = self._waiters.setdefault(name, asyncio.Event())
            await wait_event(waiters, min(max(0.0, timeout_s), MAX_WAIT_S))
        return self._mark(name)


def model_states(statuses: dict[str, list[dict]]) -> tuple[list[str], dict[str, str],
                                                            dict[str, str]]:
    """From the status board: the models loaded (a replica has a version), the ones
    failed (every replica has nothing it can load: what it tried was refused, or no
    version is promoted; model -> why) and the ones still pending (model -> why)."""
    loaded: list[str] = []
    failed: dict[str, str] = {}
    pending: dict[str, str] = {}
    for name, replicas in statuses.items():
        if any(r.get("version") for r in replicas):
            loaded.append(name)
            continue
        errors = sorted({str(r.get("last_error")) for r in replicas if r.get("last_error")})
        why = f"{name}: {', '.join(errors)}" if errors else f"{name}: loading"
        if replicas and all(r.get("state") == "failed" for r in replicas):
            failed[name] = why
        else:
            pending[name] = why
    return loaded, failed, pending
