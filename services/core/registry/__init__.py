"""The model registry: versioned, verified checkpoints on a shared filesystem.

Layout (one folder per model name, one sub-folder per version)::

    <root>/<name>/v1/                 model.safetensors, config.json, tokenizer files,
                                      manifest.json (written last)
    <root>/<name>/channels/production.json   {"version": "v1", "history": [...]}
    <root>/<name>/.staging-<id>/      a publish in progress (never listed or loaded)

Publishing copies into a staging folder, fsyncs every file, writes manifest.json last
and then renames the folder into place, so a version either exists completely or not
at all. Channel pointers are small JSON files replaced with os.replace. Weights are
only ever safetensors: a version holding a pickle-based file (by name or by its first
bytes) or a structurally unsound safetensors file is refused on publish and on verify.
Names and versions are validated by every Registry method (never a path), and a
symlink in a model or version folder is refused, never followed.
"""

from services.core.registry.store import (
    MANIFEST,
    RESERVED_CHANNELS,
    PublishResult,
    Registry,
    reserved_channel,
    validate_name,
    validate_version,
)

__all__ = ["MANIFEST", "RESERVED_CHANNELS", "PublishResult", "Registry", "reserved_channel",
           "validate_name", "validate_version"]
