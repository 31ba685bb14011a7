"""The tuneserve.v1.Admin methods of the ingress: move channels and pins, run canaries.

They act on the registry, then post a change notice on the status board, on which
every replica of the model long-polls: the replicas read the registry at once, not at
their next poll (services/serving/status.py). A notice that cannot be posted is logged;
the replicas' polls pick the change up within their poll interval all the same.
ListModels shows what each replica serves. Promote and Pin verify the version
first (manifest, sha256 of every file, labels), so a bad version is refused here before
any replica tries it.
"""

from __future__ import annotations

import asyncio
import logging

from services.core.errors import InvalidInput, ModelNotFound
from services.core.registry import canary_percent
from services.core.registry.rollout import REASON_CHARS
from services.protocol import admin_pb
from services.serving.validation import check_model_field, check_name, check_version_field

logger = logging.getLogger("ray.serve")
NOTIFY_TIMEOUT_S = 5.0


class AdminMethods:
    """Mixed into InferenceIngress; expects self.registry, self.limits, self.handles
    and self.board. Authorization (the admin token) is checked by the ingress before
    these run."""

    async def _notify(self, name: str) -> None:
        """Tell the replicas of `name` that its registry entries changed."""
        board = getattr(self, "board", None)
        if board is None:
            return
        try:
            async with asyncio.timeout(NOTIFY_TIMEOUT_S):
                await board.notify.remote(name)
        except Exception as exc:  # the replicas' polls find the change all the same
            logger.warning("could not notify the replicas of %s (%s): they pick the "
                           "change up at their next registry poll", name,
                           type(exc).__name__)

    def _admin_model(self, model: str) -> str:
        name = check_model_field(model, self.limits)
        if not self.registry.exists(name):
            raise ModelNotFound(f"model '{name}' not found in the registry")
        return name

    @staticmethod
    def _required_version(version: str) -> str:
        checked = check_version_field(version, optional=False)
        if checked is None:
            raise InvalidInput("version: required (e.g. v3)")
        return checked

    @staticmethod
    def _channel(channel: str) -> str:
        if not channel:
            return "production"
        return check_name(channel, "channel", "channel")

    async def _promote(self, request):
        name = self._admin_model(request.model)
        version = self._required_version(request.version)
        channel = self._channel(request.channel)
        previous = await asyncio.to_thread(self.registry.channel, name, channel)
        await asyncio.to_thread(self.registry.verify, name, version)
        await asyncio.to_thread(self.registry.set_channel, name, channel, version)
        await self._notify(name)
        return admin_pb.AdminResponse(model=name, channel=channel, version=version,
                                      previous_version=previous or "")

    async def _rollback(self, request):
        name = self._admin_model(request.model)
        channel = self._channel(request.channel)
        previous = await asyncio.to_thread(self.registry.channel, name, channel)
        version = await asyncio.to_thread(self.registry.rollback, name, channel)
        await self._notify(name)
        return admin_pb.AdminResponse(model=name, channel=channel, version=version,
                                      previous_version=previous or "")

    async def _pin(self, request):
        name = self._admin_model(request.model)
        version = self._required_version(request.version)
        previous = await asyncio.to_thread(self.registry.pinned_or_unreadable, name) or ""
        await asyncio.to_thread(self.registry.verify, name, version)
        await asyncio.to_thread(self.registry.pin, name, version)
        await self._notify(name)
        return admin_pb.AdminResponse(model=name, channel="pin", version=version,
                                      previous_version=previous or "")

    async def _unpin(self, request):
        name = self._admin_model(request.model)
        previous = await asyncio.to_thread(self.registry.pinned_or_unreadable, name) or ""
        await asyncio.to_thread(self.registry.unpin, name)
        await self._notify(name)
        return admin_pb.AdminResponse(model=name, channel="pin", version="",
                                      previous_version=previous or "")

    # ---- canaries ------------------------------------------------------------------
    @staticmethod
    def _reason(reason: str) -> str:
        if len(reason) > REASON_CHARS:
            raise InvalidInput(f"reason: {len(reason)} characters; the limit is "
                               f"{REASON_CHARS}")
        return reason

    async def _canary_response(self, name: str, state: dict, percent: float,
                                previous_percent: float):
        production = await asyncio.to_thread(self.registry.channel, name)
        return admin_pb.CanaryResponse(model=name, candidate_version=state["version"],
                                       production_version=production or "",
                                       percent=percent, previous_percent=previous_percent)

    async def _start_canary(self, request):
        name = self._admin_model(request.model)
        version = self._required_version(request.version)
        percent = canary_percent(request.percent)
        reason = self._reason(request.reason)
        await asyncio.to_thread(self.registry.verify, name, version)
        state = await asyncio.to_thread(self.registry.start_canary, name, version, percent,
                                        reason)
        await self._notify(name)
        return await self._canary_response(name, state, percent, 0.0)

    async def _set_canary_share(self, request):
        name = self._admin_model(request.model)
        percent = canary_percent(request.percent)
        reason = self._reason(request.reason)
        before = await asyncio.to_thread(self.registry.canary, name)
        state = await asyncio.to_thread(self.registry.set_canary_share, name, percent, reason)
        await self._notify(name)
        return await self._canary_response(name, state, percent,
                                           before["percent"] if before else 0.0)

    async def _end_canary(self, request, promote: bool):
        name = self._admin_model(request.model)
        reason = self._reason(request.reason)
        end = self.registry.promote_canary if promote else self.registry.abort_canary
        state = await asyncio.to_thread(end, name, reason)
        await self._notify(name)
        return await self._canary_response(name, state, 0.0, state["percent"])
