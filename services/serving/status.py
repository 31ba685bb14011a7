"""The status board: which version every model replica actually serves.

Each model replica reports its state here after every registry poll and after every
swap; the ingress reads it for health checks and ListModels. An entry that has not been
refreshed for a while belongs to a replica that is gone (scaled down or dead) and is
dropped. One tiny replica, no CPUs reserved.
"""

from __future__ import annotations

import time
from typing import Any

STALE_AFTER_S = 15.0


class StatusBoard:
    def __init__(self, stale_after_s: float = STALE_AFTER_S):
        self.stale_after_s = stale_after_s
        self._entries: dict[tuple[str, str], tuple[dict[str, Any], float]] = {}

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
