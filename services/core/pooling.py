"""How a classifier turns its encoder's token states into one vector per text.

    pooling, why = resolve_pooling("auto", model_folder)  # ("mean", "sentence-transformers ...")
    model = apply_pooling(hf_classifier, pooling)         # same weights, mean-pooled forward

`cls`: the model's own Hugging Face head as it is (BERT: the [CLS] state through its
pooler). `mean`: the mean of the token states under the attention mask, then the
head's classifier: what a sentence-transformers encoder was trained to give, so its
sentence vectors are already meaningful before fine-tuning. `auto` picks mean for a
folder whose sentence-transformers files (modules.json, 1_Pooling/config.json) say
mean tokens, else cls. The choice is saved in the checkpoint's config.json
(POOLING_KEY), so serving and `tuneserve eval` run the model as it was trained.
torch is imported on first use only.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Optional

from services.core.errors import ConfigError

POOLINGS = ("auto", "cls", "mean")
POOLING_KEY = "tuneserve_pooling"
"""The config.json key a checkpoint records its pooling in (absent: cls)."""
HEAD_NAMES = ("classifier", "score", "pre_classifier")
"""Module names of a Hugging Face classifier's head (the rest is the encoder)."""


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, (dict, list)) else None


def _model_file(ref: str, name: str) -> Optional[Path]:
    """A file of a local model folder, or of a Hub model in the local cache."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path / name if (path / name).is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref, name)
    except Exception:  # noqa: BLE001 - not a valid id: no such file
        return None
    return Path(cached) if isinstance(cached, str) else None


def detect_pooling(ref: str) -> tuple[str, str]:
    """(pooling, why) the model's own files ask for: a tuneserve checkpoint's recorded
    pooling, a sentence-transformers Pooling module's mode, else cls."""
    config = _model_file(ref, "config.json")
    recorded = (_read_json(config) or {}).get(POOLING_KEY) if config else None
    if recorded in ("cls", "mean"):
        return recorded, f"the checkpoint's config.json records {recorded} pooling"
    modules = _model_file(ref, "modules.json")
    for module in (_read_json(modules) or []) if modules else []:
        if not isinstance(module, dict) or not str(module.get("type", "")).endswith(".Pooling"):
            continue
        where = f"{module.get('path') or '.'}/config.json"
        found = _model_file(ref, where)
        settings = (_read_json(found) or {}) if found else {}
        if settings.get("pooling_mode_mean_tokens"):
            return "mean", (f"a sentence-transformers encoder trained with mean pooling, "
                            f"as its {where} says")
        return "cls", f"a sentence-transformers encoder without mean pooling, as its {where} says"
    return "cls", "no sentence-transformers pooling in the model folder: its own head"


def resolve_pooling(requested: str, ref: str) -> tuple[str, str]:
    """(pooling, why): the requested one, or for auto the one detect_pooling finds."""
    if requested not in POOLINGS:
        raise ConfigError(f"invalid config field 'pooling': one of {', '.join(POOLINGS)}, "
                          f"got {requested!r}")
    if requested != "auto":
        return requested, f"--pooling {requested}"
    return detect_pooling(ref)


def is_head_parameter(name: str) -> bool:
    """Whether a named parameter of a (wrapped, DDP-wrapped) classifier is its head's."""
    parts = [p for p in name.split(".") if p not in ("module", "inner")]
    return bool(parts) and parts[0] in HEAD_NAMES


def recorded_pooling(config) -> str:
    """The pooling a loaded checkpoint's config records (cls when none)."""
    return getattr(config, POOLING_KEY, None) or "cls"


def apply_pooling(model, pooling: str):
    """The classifier run with `pooling`, recorded in its config: the model itself for
    cls, a MeanPooled wrapper around it for mean. ConfigError for a head mean pooling
    cannot feed."""
    if pooling == "cls":
        model.config.update({POOLING_KEY: "cls"})
        return model
    if pooling != "mean":
        raise ConfigError(f"invalid config field 'pooling': {pooling!r} cannot be applied")
    head = getattr(model, "classifier", None)
    if head is None or not hasattr(model, "base_model") or model.base_model is model:
        raise ConfigError(f"invalid config field 'pooling': mean pooling needs a classifier "
                          f"head named 'classifier' over an encoder; "
                          f"{type(model).__name__} has none (use --pooling cls)")
    return _mean_pooled_class()(model)


def unwrap(model):
    """The Hugging Face model inside a MeanPooled wrapper (or the model itself)."""
    return getattr(model, "inner", model)


@functools.lru_cache(maxsize=None)
def _mean_pooled_class() -> Any:
    """MeanPooled, made on first use (torch is imported here, not at module load)."""
    import torch
    from transformers.modeling_outputs import SequenceClassifierOutput

    class MeanPooled(torch.nn.Module):
        """A Hugging Face sequence classifier whose head reads the masked mean of the
        encoder's token states. Its weights and save_pretrained are the inner model's
        (the unused pooler dropped), with POOLING_KEY=mean in config.json."""

        def __init__(self, inner):
            super().__init__()
            if getattr(inner.base_model, "pooler", None) is not None:
                inner.base_model.pooler = None  # unused: DDP wants every weight used
            inner.config.update({POOLING_KEY: "mean"})
            self.inner = inner

        @property
        def config(self):
            return self.inner.config

        @property
        def base_model(self):
            return self.inner.base_model

        @property
        def dtype(self):
            return self.inner.dtype

        @property
        def device(self):
            return self.inner.device

        def save_pretrained(self, *args, **kwargs):
            return self.inner.save_pretrained(*args, **kwargs)

        def forward(self, input_ids, attention_mask=None, token_type_ids=None, **_):
            kwargs = {"input_ids": input_ids}
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            hidden = self.inner.base_model(**kwargs)[0]
            if attention_mask is None:
                attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            head = self.inner.classifier
            if isinstance(head, torch.nn.Linear):  # BERT-style: dropout, then linear
                dropout = getattr(self.inner, "dropout", None)
                logits = head(dropout(pooled) if dropout is not None else pooled)
            else:  # RoBERTa/MPNet-style heads read features[:, 0]
                logits = head(pooled.unsqueeze(1))
            return SequenceClassifierOutput(logits=logits)

    return MeanPooled
