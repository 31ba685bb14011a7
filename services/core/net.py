"""Network helpers shared by the servers, the demo and the CLI: free ports, ports in
use, addresses of this machine."""

from __future__ import annotations

import errno
import socket
from typing import Optional


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bind_error(port: int) -> Optional[int]:
    """The errno of binding `port` on every address (IPv6 and 4), or None if it can be."""
    for family, addr in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this machine
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is free
            try:
                sock.bind((addr, port))
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL:  # e.g. IPv6 present but disabled
                    return exc.errno
    return None


def port_in_use(port: int) -> bool:
    """Whether something on this machine listens on `port` (any address, IPv4 or 6)."""
    return bind_error(port) == errno.EADDRINUSE


def host_problem(host: str) -> Optional[str]:
    """Why Serve's proxies could not listen on `host` here (None: they can)."""
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return "is not a name this machine can resolve"
    for family, _, _, _, addr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind(addr)
                return None
        except OSError:
            continue
    return "is not an address of this machine"
