"""The part every model deployment shares: following the registry. No gRPC in here.

A replica follows its model's channel (`production` by default), or a version pinned
through `reconfigure` (Serve `user_config`) or the registry: a background task reads
the registry every poll interval, and at once when told of a change (a `reconfigure`,
or a notice on the status board, which the Admin methods send after each change and
a second task long-polls: services/serving/status.py); when the target moves, it verifies and loads the new version beside the old one (the
subclass's `_load_version`, which smoke-tests it) and swaps the reference atomically.
A version failing a check (a TuneserveError) is refused for good; other load failures
are tried again up to LOAD_ATTEMPTS times, the old version serving meanwhile
(docs/design.md). Subclasses (Classifier, Generator) add the inference methods,
`_load_version` and `_status_extra`.

Canary: while the registry names a candidate beside production (canary.json) and the
replica follows production unpinned, it holds the candidate loaded too (verified and
smoke-tested the same way) and `_answer` sends each request without an explicit version
to it by the share: a request with a routing key by a hash of the key (the same key,
the same version, on every replica), one without by chance. A request that fails on
the candidate with a server-side error is answered by production instead and counted
(tuneserve_canary_fallbacks_total).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import random
import threading
import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Optional

from ray import serve

from services.core import metrics
from services.core.errors import (
    CorruptVersion,
    InvalidInput,
    ModelLoading,
    ModelNotFound,
    RegistryError,
    TuneserveError,
    UnreadableVersion,
)
from services.core.registry import CANARY_CHANNEL, Registry, validate_name, validate_version
from services.core.registry.store import pointer_version
from services.serving import serve_logs
from services.serving.waiting import wait_event, wait_within

logger = logging.getLogger("ray.serve")
_PROCESS_LOADS = threading.Lock()

LOAD_ATTEMPTS = 3
"""Tries of a version whose load failed with an unexpected error before it is refused."""
LOAD_RETRY_MAX_WAIT_S = 60.0
WATCH_S = 10.0
"""How long one long poll of the status board for change notices is held open."""
REFUSED_RETRY_S = 300.0
"""A version refused after LOAD_ATTEMPTS unexpected failures (a read error, say) is tried
again after this long; one refused by a check (a bad checksum) is not, unless its
pointer is written again (Promote or Pin of it, which re-arms any refusal)."""
FALLBACK_CODES = ("INTERNAL", "UNAVAILABLE")
"""The status codes of a candidate's failure that production answers instead (with
any error not ours, and a version that could not be loaded or was refused)."""


def routing_point(routing_key: Optional[str]) -> float:
    """Where a request falls in [0, 100): by a hash of its routing key (the same on
    every replica and process), else at random. A request goes to the candidate when
    its point is below the share, so raising the share keeps a key's version."""
    if not routing_key:
        return random.random() * 100.0
    digest = hashlib.sha256(routing_key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 * 100.0


def falls_back(exc: BaseException) -> bool:
    """Whether a failure on the candidate is the server's (answered by production)
    rather than the request's (which production would refuse alike)."""
    if not isinstance(exc, TuneserveError):
        return isinstance(exc, Exception)
    return exc.grpc_code in FALLBACK_CODES or isinstance(exc, RegistryError)


class RegistryFollower:
    """Base class of the model deployment classes; `app.py` wraps those with
    `serve.deployment`."""

    def __init__(self, registry: str, name: str, channel: str = "production",
                 poll_interval_s: float = 2.0, threads: Optional[int] = None,
                 cache_versions: int = 2, board: Any = None, dtype: str = "auto"):
        import torch

        serve_logs.install()  # a request found bad here is one INFO line, not a traceback
        torch.set_num_threads(max(1, int(threads or math.ceil(
            float(os.environ.get("TUNESERVE_REPLICA_CPUS", "1"))))))
        self.registry = Registry(registry)
        self.name = name
        self.channel = channel
        self.pinned: Optional[str] = None
        self.poll_interval_s = poll_interval_s
        self.cache_versions = cache_versions
        self.dtype = dtype  # ServeConfig.dtype: what _load_version loads weights in
        self.current: Optional[Any] = None
        self.others: OrderedDict[str, Any] = OrderedDict()
        self.refused: dict[str, str] = {}
        # version -> (failed loads so far, monotonic time of the next try): unexpected
        # failures, tried again until LOAD_ATTEMPTS
        self.failed_loads: dict[str, tuple[int, float]] = {}
        # version -> monotonic time it was refused after unexpected failures
        self.gave_up: dict[str, float] = {}
        # The updated_at of the pointer that named the target at the last poll: written
        # again (a Promote or Pin of the same version), a refusal of it is retried.
        self._target_stamp: Any = None
        self._seen_stamp: Any = None
        self.last_error: Optional[str] = None
        self.state = "loading"
        self._wake = asyncio.Event()
        self._load_lock = asyncio.Lock()
        self._follower: Optional[asyncio.Task] = None
        self._watcher: Optional[asyncio.Task] = None  # long-polls the board's notices
        self._started = False
        self.board = board  # DeploymentHandle of the StatusBoard, if any
        # The registry's canary while it applies here: {"version", "percent", ...}, and
        # the candidate loaded beside self.current (None until loaded, or refused).
        self.canary: Optional[dict[str, Any]] = None
        self.candidate: Optional[Any] = None
        self._exported_share: Optional[tuple[str, float]] = None  # (candidate, percent)

    def _load_version(self, version: str) -> Any:
        """Verify, load and smoke-test one version (runs in a worker thread). The result
        has a `version` attribute. Raise a TuneserveError to refuse the version."""
        raise NotImplementedError

    def _status_extra(self) -> dict[str, Any]:
        """Task-specific fields of `status`."""
        return {}

    def _load_serialized(self, version: str) -> Any:
        # One load at a time per process: colocated models (services/serving/colocated.py)
        # share one, and importing transformers' model classes from two threads at once
        # fails in one of them (its lazy module is not thread-safe).
        with _PROCESS_LOADS:
            return self._load_version(version)

    def _ensure_follower(self) -> None:
        if self._follower is None or self._follower.done():
            self._follower = asyncio.get_running_loop().create_task(self._follow())
        if self.board is not None and (self._watcher is None or self._watcher.done()):
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Wake the follower whenever the status board has a change notice for this
        model (and once as it starts, for a notice sent before the first long poll).
        A board that cannot be reached is asked again after a poll interval; the
        follower's polls go on meanwhile."""
        seen: Optional[str] = None
        while True:
            try:
                async with asyncio.timeout(WATCH_S + 10):
                    mark = await self.board.wait_change.remote(self.name, seen, WATCH_S)
            except Exception:  # the board restarting, or gone: polls alone meanwhile
                logger.debug("change notices for %s unavailable", self.name, exc_info=True)
                seen = None
                await asyncio.sleep(self.poll_interval_s)
                continue
            if mark != seen:
                self._wake.set()
            seen = mark

    async def reconfigure(self, user_config: dict) -> None:
        """Record the target; later loads happen in the background (never blocks).

        The first call, while the replica starts, does load the target before
        returning: Serve sends no traffic to a replica until then, so a replica that
        autoscaling adds never answers "loading" while its peers could answer.
        """
        user_config = user_config or {}
        pinned = user_config.get("pinned_version") or None
        channel = user_config.get("channel") or self.channel
        try:
            if pinned is not None:
                validate_version(str(pinned))
            validate_name(str(channel), "channel")
        except InvalidInput as exc:
            # A bad declarative setting keeps the current target and says why (status).
            self.last_error = f"user_config ignored: {exc}"
            logger.warning("%s: %s", self.name, self.last_error)
        else:
            self.pinned, self.channel = pinned, channel
        if user_config.get("poll_interval_s"):
            self.poll_interval_s = float(user_config["poll_interval_s"])
        if not self._started:
            self._started = True
            target = await asyncio.to_thread(self._target)
            if target:
                await self._switch_to(target)
                await self._fall_back(target)
                try:  # a replica added mid-rollout takes its share at once
                    await self._follow_canary()
                except TuneserveError as exc:  # an unreadable canary: production serves
                    self.last_error = exc.message
                    logger.warning("%s: %s", self.name, exc.message)
        self._ensure_follower()
        self._wake.set()

    def _target(self) -> Optional[str]:
        """user_config pin > registry pin (Admin Pin) > the channel's version. Notes
        the pointer's stamp (_rearm)."""
        if self.pinned:
            self._target_stamp = ("config", self.pinned)
            return self.pinned if self.registry.exists(self.name, self.pinned) else None
        pin = self.registry.pin_state(self.name)
        pinned = pointer_version(pin)
        if pinned:
            self._target_stamp = ("pin", pin.get("updated_at"))
            return pinned if self.registry.exists(self.name, pinned) else None
        state = self.registry.channel_state(self.name, self.channel)
        self._target_stamp = (self.channel, state.get("updated_at"))
        return pointer_version(state)

    def _rearm(self, target: Optional[str]) -> None:
        """Forget a refusal of `target` when its pointer was written since the last
        poll (an operator promoting or pinning it again after fixing it), or when it was
        refused for unexpected failures REFUSED_RETRY_S ago (a read error that passed)."""
        stamp, seen = self._target_stamp, self._seen_stamp
        self._seen_stamp = stamp
        if target not in self.refused:
            return
        # The same pointer written again, or a pin now naming the version; not a
        # move back to the channel (an Unpin), which names no version on purpose.
        rewritten = seen is not None and stamp != seen and (
            stamp[0] == seen[0] or stamp[0] == "pin")
        expired = time.monotonic() - self.gave_up.get(target, math.inf) >= REFUSED_RETRY_S
        if rewritten or expired:
            logger.info("%s: trying %s again (%s)", self.name, target,
                        "its pointer was written again" if rewritten else
                        f"refused {REFUSED_RETRY_S:g} s ago after unexpected failures")
            self.refused.pop(target, None)
            self.gave_up.pop(target, None)
            self.failed_loads.pop(target, None)

    async def _follow(self) -> None:
        while True:
            # Cleared before the registry is read: a notice arriving during this pass
            # wakes the next one at once.
            self._wake.clear()
            try:
                target = await asyncio.to_thread(self._target)
                self._rearm(target)
                current = self.current.version if self.current else None
                if target and target != current and target not in self.refused and \
                        self._may_try(target):
                    await self._switch_to(target)
                if target:
                    await self._fall_back(target)
                    await self._follow_canary()
                elif target is None and current is None:
                    # nothing to serve until a version is promoted: "failed", so that a
                    # server starting does not wait for it (status.model_states)
                    self.state = "failed"
                    self.last_error = (f"model '{self.name}' has no {self.channel} version"
                                       if not self.pinned else
                                       f"pinned version {self.pinned} does not exist")
            except Exception as exc:  # the follower must never die
                logger.exception("registry poll failed for %s", self.name)
                self.last_error = str(exc)
            await self._report()
            for served in (self.current, self.candidate):  # refreshed every poll, so the
                if served is not None:                      # series stay live
                    metrics.set_gauge("tuneserve_model_info", 1, model=self.name,
                                      version=served.version)
            self._export_share()
            await wait_event(self._wake, self.poll_interval_s)

    def _read_canary(self) -> Optional[dict[str, Any]]:
        """The registry's canary, where it applies: this replica follows production and
        nothing pins it (a pin serves one version everywhere). Right after `_target`."""
        if self.pinned or self.channel != CANARY_CHANNEL or \
                (self._target_stamp or ("pin",))[0] == "pin":
            return None
        return self.registry.canary(self.name)

    async def _follow_canary(self) -> None:
        """Hold the registry's candidate loaded beside production, or drop it."""
        canary = await asyncio.to_thread(self._read_canary)
        current = self.current.version if self.current else None
        if canary is None or canary["version"] == current or current is None:
            self.canary = None
            self._hold_candidate(None)
            return
        version = canary["version"]
        if self.candidate is None or self.candidate.version != version:
            self._hold_candidate(None)
            if version not in self.refused and self._may_try(version):
                try:
                    self._hold_candidate(await self._get_or_load(version))
                except TuneserveError:  # refused or to be tried again: status says
                    pass
        self.canary = canary

    def _export_share(self) -> None:
        """tuneserve_canary_percent: the share this replica routes to its candidate
        (the rollout's step as served), 0 for a candidate it no longer holds."""
        share = None
        if self.canary is not None and self.candidate is not None and \
                self.candidate.version == self.canary["version"]:
            share = (self.candidate.version, float(self.canary["percent"]))
        last, self._exported_share = self._exported_share, share
        if last is not None and (share is None or last[0] != share[0]):
            metrics.set_gauge("tuneserve_canary_percent", 0, model=self.name, version=last[0])
        if share is not None:
            metrics.set_gauge("tuneserve_canary_percent", share[1], model=self.name,
                              version=share[0])

    def _hold_candidate(self, loaded: Any) -> None:
        """Hold `loaded` as the candidate (None: none); tuneserve_model_info counts it
        as served while held."""
        old, self.candidate = self.candidate, loaded
        current = self.current.version if self.current else None
        if old is not None and old.version not in (current, getattr(loaded, "version", None)):
            metrics.set_gauge("tuneserve_model_info", 0, model=self.name, version=old.version)
        if loaded is not None:
            metrics.set_gauge("tuneserve_model_info", 1, model=self.name,
                              version=loaded.version)

    def _pick_candidate(self, version: Optional[str], routing_key: Optional[str]) -> Any:
        """The candidate when this request goes to it (else None)."""
        candidate, canary = self.candidate, self.canary
        if version is not None or candidate is None or canary is None or \
                self.current is None or candidate.version != canary["version"]:
            return None
        return candidate if routing_point(routing_key) < canary["percent"] else None

    async def _answer(self, version: Optional[str], routing_key: Optional[str],
                      call: Callable[[Any], Awaitable[Any]]) -> Any:
        """`call(loaded)` on the version that answers this request: the one named, else
        the candidate by its share, else production; production again when the
        candidate fails with a server-side error (module docstring)."""
        self._ensure_follower()
        candidate = self._pick_candidate(version, routing_key)
        if candidate is None:
            return await call(await self._model_for(version))
        try:
            return await call(candidate)
        except Exception as exc:
            if not falls_back(exc) or self.current is None:
                raise
            self.fell_back(candidate.version, exc)
        return await call(await self._model_for(None))

    def fell_back(self, version: str, exc: BaseException) -> None:
        """Count a request the candidate `version` failed and production answered."""
        metrics.inc("tuneserve_canary_fallbacks_total", model=self.name, version=version)
        logger.warning("%s: candidate %s failed a request (%s); production answered it",
                       self.name, version, exc.message if isinstance(exc, TuneserveError)
                       else type(exc).__name__)

    async def _fall_back(self, target: str) -> None:
        """A replica with nothing loaded whose target was refused (e.g. one started while
        the channel points at a bad version) serves what the channel pointed at before,
        newest first, as the replicas that were running already do."""
        if self.current is not None or target not in self.refused:
            return
        state = await asyncio.to_thread(self.registry.channel_state, self.name, self.channel)
        earlier = [state.get("version"), *reversed(state.get("history") or [])]
        for version in dict.fromkeys(v for v in earlier if isinstance(v, str) and v != target):
            if version in self.refused or not self._may_try(version):
                continue
            try:
                if not await asyncio.to_thread(self.registry.exists, self.name, version):
                    continue
            except TuneserveError:  # a malformed entry in the channel's history
                continue
            await self._switch_to(version)
            if self.current is not None:
                self.last_error = (f"serving {version}: {target} was refused "
                                   f"({self.refused[target]})")
                logger.warning("%s: %s", self.name, self.last_error)
                return

    def _may_try(self, version: str) -> bool:
        """Whether a version's load may be tried now (its wait after a failure is over)."""
        return self.failed_loads.get(version, (0, 0.0))[1] <= time.monotonic()

    def _load_failed(self, version: str, exc: Exception) -> TuneserveError:
        """Count an unexpected load failure; the error for whoever asked for the version."""
        attempts = self.failed_loads.get(version, (0, 0.0))[0] + 1
        # clients see status; the log has the whole error (an UnreadableVersion's
        # message names only the file, relative to the version)
        what = exc.message if isinstance(exc, UnreadableVersion) else type(exc).__name__
        logger.error("loading %s %s failed (attempt %d of %d)", self.name, version,
                     attempts, LOAD_ATTEMPTS, exc_info=exc)
        if attempts >= LOAD_ATTEMPTS:
            self.failed_loads.pop(version, None)
            self.refused[version] = f"load failed {attempts} times: {what}"
            self.gave_up[version] = time.monotonic()
            self.last_error = self.refused[version]
            metrics.inc("tuneserve_model_loads_total", model=self.name, result="refused")
            return CorruptVersion(f"version {version} of '{self.name}' could not be "
                                  f"loaded ({attempts} attempts)")
        wait = min(self.poll_interval_s * 2 ** (attempts - 1), LOAD_RETRY_MAX_WAIT_S)
        self.failed_loads[version] = (attempts, time.monotonic() + wait)
        self.last_error = (f"load of {version} failed (attempt {attempts} of "
                           f"{LOAD_ATTEMPTS}, next in {wait:g} s): {what}")
        metrics.inc("tuneserve_model_loads_total", model=self.name, result="failed")
        return ModelLoading(f"version {version} of '{self.name}' failed to load (attempt "
                            f"{attempts} of {LOAD_ATTEMPTS}); retry shortly")

    async def _get_or_load(self, version: str) -> Any:
        async with self._load_lock:
            for loaded in (self.current, self.candidate, *self.others.values()):
                if loaded is not None and loaded.version == version:
                    return loaded
            if version in self.refused:
                raise CorruptVersion(f"version {version} of '{self.name}' was refused: "
                                     f"{self.refused[version]}")
            if not self._may_try(version):
                attempts, at = self.failed_loads[version]
                raise ModelLoading(
                    f"version {version} of '{self.name}' failed to load ({attempts} of "
                    f"{LOAD_ATTEMPTS} attempts); next try in "
                    f"{max(0.0, at - time.monotonic()):.0f} s")
            started = time.perf_counter()
            try:
                loaded = await asyncio.to_thread(self._load_serialized, version)
            except UnreadableVersion as exc:  # a read error: tried again, like an OSError
                raise self._load_failed(version, exc) from None
            except TuneserveError as exc:
                self.refused[version] = exc.message
                self.last_error = exc.message
                logger.error("refused %s %s: %s", self.name, version, exc.message)
                metrics.inc("tuneserve_model_loads_total", model=self.name, result="refused")
                raise
            except Exception as exc:
                raise self._load_failed(version, exc) from None
            self.failed_loads.pop(version, None)
            elapsed = time.perf_counter() - started
            # What the weights are in (ServeConfig.dtype "auto" resolved); a loaded
            # object without a dtype (a test's stand-in) shows the setting.
            logger.info("loaded %s %s in %.2fs (dtype %s, runtime %s)", self.name, version,
                        elapsed, getattr(loaded, "dtype", None) or self.dtype,
                        getattr(loaded, "runtime", "eager"))
            metrics.inc("tuneserve_model_loads_total", model=self.name, result="loaded")
            metrics.observe("tuneserve_model_load_duration_seconds", elapsed, model=self.name)
            return loaded

    async def _switch_to(self, version: str) -> None:
        try:
            loaded = await self._get_or_load(version)
        except TuneserveError:
            # a version to be tried again: still loading; one refused: failed
            self.state = "ready" if self.current else \
                "loading" if version in self.failed_loads else "failed"
            return
        self.others.pop(version, None)
        old = self.current
        # The swap is one reference assignment. Requests already running hold their
        # own reference to the old model, so it is freed when the last one finishes.
        self.current = loaded
        metrics.set_gauge("tuneserve_model_info", 1, model=self.name, version=version)
        if old is not None and old.version != version:
            metrics.set_gauge("tuneserve_model_info", 0, model=self.name, version=old.version)
        self.state = "ready"
        self.last_error = None
        await self._report()

    async def _report(self) -> None:
        if self.board is None:
            return
        try:
            status = await self.status()
            await wait_within(
                self.board.report.remote(status, stale_after_s=3 * self.poll_interval_s + 10),
                5)
        except Exception:  # the board is advisory; serving goes on without it
            logger.warning("status report for %s failed", self.name, exc_info=True)

    def _remember(self, loaded: Any) -> None:
        self.others[loaded.version] = loaded
        self.others.move_to_end(loaded.version)
        while len(self.others) > self.cache_versions:
            self.others.popitem(last=False)  # memory freed once in-flight calls finish

    async def _model_for(self, version: Optional[str]) -> Any:
        self._ensure_follower()
        if version is None or (self.current and self.current.version == version):
            if self.current is None:
                raise ModelLoading(f"model '{self.name}' is loading; retry shortly"
                                   + (f" ({self.last_error})" if self.last_error else ""))
            return self.current
        candidate = self.candidate
        if candidate is not None and candidate.version == version:
            return candidate
        if version in self.others:
            self.others.move_to_end(version)
            return self.others[version]
        if not await asyncio.to_thread(self.registry.exists, self.name, version):
            raise ModelNotFound(f"model '{self.name}' has no version '{version}'")
        loaded = await self._get_or_load(version)
        self._remember(loaded)
        return loaded

    async def status(self) -> dict[str, Any]:
        self._ensure_follower()
        ctx = serve.get_replica_context()
        return {
            "name": self.name, "state": self.state,
            "version": self.current.version if self.current else None,
            "dtype": self.current.dtype if self.current else None,
            "cached_versions": list(self.others), "pinned_version": self.pinned,
            "channel": self.channel, "refused": dict(self.refused),
            "refusals": len(self.refused),
            "last_error": self.last_error, "replica": ctx.replica_tag if ctx else None,
            "canary": None if self.canary is None else {
                "version": self.canary["version"], "percent": self.canary["percent"],
                "loaded": self.candidate is not None},
            **self._status_extra(),
        }

    async def check_health(self) -> None:
        # A replica whose follower died would never pick up new versions: restart it.
        if self._follower is not None and self._follower.done():
            raise RuntimeError("registry follower stopped")
