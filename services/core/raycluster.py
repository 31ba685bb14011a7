"""Connecting to Ray: a running cluster (`--address`, RAY_ADDRESS) or a local one
started in-process (the embedded default)."""

from __future__ import annotations

import logging
import os
import socket
from typing import Optional

from services.core.errors import ConfigError

# Set before Ray is imported anywhere: no usage-stats reporting (no network here).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls for the workers' reports, and a worker's next report
# waits for it: a short poll keeps checkpoints from stalling training (docs/design.md).
# Ray Train hands it from the driver to its controller, on a local cluster or a joined one.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


REACH_TIMEOUT_S = 5.0


def check_reachable(address: str, flag: str = "--address") -> None:
    """A HOST:PORT (or ray://HOST:PORT) that does not answer fails here in seconds:
    ray.init would retry the connection without end. "auto" is left to Ray."""
    if address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ConfigError(f"{flag} {address!r}: expected HOST:PORT of a Ray cluster's head "
                          "(e.g. 10.0.0.5:6379, or ray://10.0.0.5:10001), or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else \
            (exc.strerror or type(exc).__name__)
        raise ConfigError(f"{flag} {address}: cannot reach a Ray cluster there ({why}); "
                          "check the head's address and port, or leave it out for a local "
                          "cluster") from None


def ensure_ray(address: Optional[str] = None, *, num_cpus: Optional[float] = None,
               metrics_port: Optional[int] = None, verbose: bool = False) -> bool:
    """Initialise Ray once. Returns True if this call started a local cluster."""
    import ray

    if ray.is_initialized():
        return False
    flag = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    level = logging.INFO if verbose else logging.WARNING
    if address:
        check_reachable(address, flag)
        ray.init(address=address, logging_level=level, log_to_driver=verbose)
        if not verbose:
            logging.getLogger("ray.serve").setLevel(logging.WARNING)
        return False
    # address="local": always a new cluster of our own. Without it Ray joins whatever
    # cluster another process on the machine started last (/tmp/ray/ray_current_cluster).
    kwargs = dict(address="local", include_dashboard=False, logging_level=level, log_to_driver=verbose,
                  configure_logging=True)
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    if metrics_port is not None:
        kwargs["_metrics_export_port"] = metrics_port
    ray.init(**kwargs)
    if not verbose:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    return True
