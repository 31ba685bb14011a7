"""The model registry: versioned, verified checkpoints on a shared filesystem or an
S3-compatible store.

Layout (one folder per model name, one sub-folder per version)::

    <root>/<name>/v1/                 model.safetensors, config.json, tokenizer files,
                                      manifest.json (written last)
    <root>/<name>/channels/production.json   {"version": "v1", "history": [...]}
    <root>/<name>/canary.json         the candidate beside production and its share
    <root>/<name>/history.jsonl       the rollout history (services/core/registry/rollout.py)
    <root>/<name>/.staging-<id>/      a publish in progress (never listed or loaded)

A version exists completely or not at all; channel pointers are replaced atomically;
weights are safetensors only; names and versions are validated by every Registry
method (never a path), and a symlink in a model or version folder is never followed.
"""

from services.core.names import (RESERVED_CHANNELS, reserved_channel, validate_name,
                                 validate_version)
from services.core.registry.rollout import CANARY_CHANNEL, active_canary, canary_percent
from services.core.registry.store import MANIFEST, PublishResult, Registry

__all__ = ["CANARY_CHANNEL", "MANIFEST", "RESERVED_CHANNELS", "PublishResult", "Registry",
           "active_canary", "canary_percent", "reserved_channel", "validate_name",
           "validate_version"]
