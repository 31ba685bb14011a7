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
