"""The tuneserve.v1.Admin methods of the ingress: move channels and pins.

They act on the registry; every replica picks the change up within its poll interval
(and ListModels shows what each replica serves). Promote and Pin verify the version
first (manifest, sha256 of every file, labels), so a bad version is refused here before
any replica tries it.
"""

from __future__ import annotations

import asyncio

from services.core.errors import InvalidInput, ModelNotFound
from services.protocol import admin_pb
from services.serving.validation import check_model_field, check_name, check_version_field


class AdminMethods:
    """Mixed into InferenceIngress; expects self.registry, self.limits, self.handles.
    Authorization (the admin token) is checked by the ingress before these run."""

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
        return admin_pb.AdminResponse(model=name, channel=channel, version=version,
                                      previous_version=previous or "")

    async def _rollback(self, request):
        name = self._admin_model(request.model)
        channel = self._channel(request.channel)
        previous = await asyncio.to_thread(self.registry.channel, name, channel)
        version = await asyncio.to_thread(self.registry.rollback, name, channel)
        return admin_pb.AdminResponse(model=name, channel=channel, version=version,
                                      previous_version=previous or "")

    async def _pin(self, request):
        name = self._admin_model(request.model)
        version = self._required_version(request.version)
        previous = await asyncio.to_thread(self.registry.pinned_or_unreadable, name) or ""
        await asyncio.to_thread(self.registry.verify, name, version)
        await asyncio.to_thread(self.registry.pin, name, version)
        return admin_pb.AdminResponse(model=name, channel="pin", version=version,
                                      previous_version=previous or "")

    async def _unpin(self, request):
        name = self._admin_model(request.model)
        previous = await asyncio.to_thread(self.registry.pinned_or_unreadable, name) or ""
        await asyncio.to_thread(self.registry.unpin, name)
        return admin_pb.AdminResponse(model=name, channel="pin", version="",
                                      previous_version=previous or "")
