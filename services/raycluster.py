"""Connecting to Ray: a running cluster (`--address`, RAY_ADDRESS) or a local one
started in-process (the embedded default)."""

from __future__ import annotations

import logging
import os
from typing import Optional

# Set before Ray is imported anywhere: no usage-stats reporting (no network here).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller takes in one report per worker each poll (2 s by default) and
# a worker's next report waits for it: on a short run, or one that evaluates every few
# seconds, each checkpoint stalled training ~2 s and the run's end waited for the
# backlog (a 24-step run with 6 evaluations: 37 s -> 24 s at 0.5 s; the poll also
# finds a dead worker sooner). A local cluster's processes inherit this; on a running
# cluster the controller reads its own environment.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def ensure_ray(address: Optional[str] = None, *, num_cpus: Optional[float] = None,
               metrics_port: Optional[int] = None, verbose: bool = False) -> bool:
    """Initialise Ray once. Returns True if this call started a local cluster."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    level = logging.INFO if verbose else logging.WARNING
    if address:
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
