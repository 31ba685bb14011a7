"""Names of models, channels and versions: what the registry accepts, checked before
any name reaches a path. Light on purpose: the config checks names while the CLI parses
flags, without loading the registry."""

from __future__ import annotations

import re

from services.core.errors import InvalidInput

# \Z, not $: "$" also matches before a trailing newline ("m\n" would pass).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
VERSION_RE = re.compile(r"^v([1-9][0-9]{0,8})\Z")
# Admin replies to Pin and Unpin name "pin" where others name the channel they moved:
# no channel may be called so.
RESERVED_CHANNELS = ("pin",)


def validate_name(name: str, what: str = "model") -> str:
    """Model and channel names: 1-128 ASCII letters, digits, '.', '_', '-', starting
    with a letter or digit, no '..'. So never a path: no '/', '\\', NUL, '.', '..' or
    absolute path can reach the filesystem. Every Registry method checks its names."""
    if not isinstance(name, str):
        raise InvalidInput(f"{what} name must be a string")
    if not name:
        raise InvalidInput(f"{what} name is empty")
    if not NAME_RE.match(name) or ".." in name:
        raise InvalidInput(
            f"invalid {what} name {name[:64]!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if what == "channel" and name in RESERVED_CHANNELS:
        raise InvalidInput(reserved_channel(name))
    return name


def reserved_channel(name: str) -> str:
    return (f"channel name {name!r} is reserved (Admin replies to Pin and Unpin carry it); "
            "to serve one version everywhere, pin it instead")


def validate_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise InvalidInput(f"invalid version {str(version)[:64]!r}: expected v1, v2, ...")
    return version
