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
