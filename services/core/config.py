"""Typed configuration for training runs and for serving.

`TrainConfig` is the flat input (YAML keys and CLI flags are its field names);
`TrainConfig.resolve()` (also `validate()`) checks it and returns a new frozen
`ResolvedTrainConfig` grouped into data, modeling, optim, cluster and publish
sections, with each task's defaults filled in; nothing writes into either afterwards.
Its flat `to_dict()` is what a version's manifest saves as `config`. Task defaults
live in `TASK_DEFAULTS` here (core does not import training; each training task class
reads its row). Units are in the names (`_s`, `_chars`).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import inspect
import json
import math
import os
import ssl
import string
import textwrap
import urllib.parse
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from services.core.errors import ConfigError, TuneserveError
from services.core.names import validate_name
from services.core.pooling import POOLINGS

DEFAULT_HOME = Path(os.environ.get("TUNESERVE_HOME", ".tuneserve"))
DEFAULT_REGISTRY = str(DEFAULT_HOME / "registry")
DEFAULT_RUNS_DIR = str(DEFAULT_HOME / "runs")
CLASSIFICATION = "classification"
GENERATION = "generation"
TASKS = (CLASSIFICATION, GENERATION)
STRATEGIES = ("auto", "ddp", "fsdp")
"""TrainConfig.strategy: how the workers hold the model (services/training/parallel.py)."""
"""The task names a run, a manifest and a served model carry; compare with these
constants, never with string literals."""
SEED_MAX = 2**64 - 1
"""The largest seed torch.manual_seed takes (it reads the seed as an unsigned 64-bit
integer)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_port(name: str, value: Any) -> Any:
    """A TCP port (1-65535) of a serve setting; ConfigError naming the setting."""
    if not _is_int(value) or not 1 <= value <= 65535:
        raise ConfigError(f"invalid serve setting '{name}': {value!r} is not a port number "
                          "(1-65535)")
    return value


@functools.lru_cache(maxsize=None)
def field_help(cls) -> dict[str, str]:
    """Field docstrings (the string literal after each field) as help texts. Read once
    per process."""

    source = textwrap.dedent(inspect.getsource(cls))
    for attempt in range(3):
        try:
            tree = ast.parse(source)
            break
        except SystemError:
            # CPython 3.11 counts ast.parse's depth in state shared by every thread: a
            # parse in another thread at the same moment (3.11 formats a traceback's
            # ^^^ markers with one) fails it with "AST constructor recursion depth
            # mismatch" (python/cpython#106905). Parsing again is all it takes.
            if attempt == 2:
                raise
    helps: dict[str, str] = {}
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            helps[node.target.id] = " ".join(str(nxt.value.value).split())
    return helps


def parse_min_metric(spec: Optional[str]) -> Optional[tuple[str, float]]:
    if not spec:
        return None
    name, sep, value = spec.partition("=")
    try:
        if not sep or not name.strip():
            raise ValueError
        return name.strip(), float(value)
    except ValueError:
        raise ConfigError(f"invalid config field 'min_metric': expected NAME=NUMBER "
                          f"(e.g. accuracy=0.85), got {spec!r}") from None


@dataclass(frozen=True)
class TaskDefaults:
    """A task's values for the training fields left unset (docs/quality.md says why),
    and the eval metrics its runs record."""

    epochs: int
    learning_rate: float
    warmup_ratio: float
    group_by_length: bool
    metrics: tuple[str, ...]
    """The eval metrics a run records, which --min-metric may name."""
    lora_learning_rate: Optional[float] = None
    """learning_rate with LoRA (None: LoRA does not apply to the task)."""

    def fill(self, values: dict[str, Any]) -> dict[str, Any]:
        """The defaults of the fields that `values` (flat TrainConfig fields) leaves None."""
        lr = self.lora_learning_rate if values["lora_r"] and self.lora_learning_rate \
            else self.learning_rate
        filled = {"epochs": self.epochs, "learning_rate": lr,
                  "warmup_ratio": self.warmup_ratio, "group_by_length": self.group_by_length}
        return {name: value for name, value in filled.items() if values[name] is None}


TASK_DEFAULTS = {
    CLASSIFICATION: TaskDefaults(
        epochs=3, learning_rate=5e-5, warmup_ratio=0.06, group_by_length=True,
        metrics=("accuracy", "macro_f1", "macro_precision", "macro_recall", "loss")),
    GENERATION: TaskDefaults(
        epochs=2, learning_rate=2e-5, lora_learning_rate=2e-4, warmup_ratio=0.03,
        group_by_length=False, metrics=("loss", "perplexity")),
}
"""One row per task name in TASKS: a new task adds its row here and its class in
services/training/tasks.py."""
GATE_METRICS = {task: defaults.metrics for task, defaults in TASK_DEFAULTS.items()}
"""The eval metrics a run of each task records, which --min-metric may name."""
LOWER_IS_BETTER = ("loss", "perplexity")


def check_min_metric(spec: str, task: str) -> tuple[str, float]:
    """parse_min_metric, and the name is one the task records, the bound one it can meet."""
    name, bound = parse_min_metric(spec)
    known = GATE_METRICS.get(task, ())
    if name not in known:
        raise ConfigError(f"invalid config field 'min_metric': a {task} run records "
                          f"{', '.join(known)}; got {name!r}")
    if not math.isfinite(bound):
        raise ConfigError(f"invalid config field 'min_metric': {name} bound must be a finite "
                          f"number, got {bound}")
    if name not in LOWER_IS_BETTER and not 0.0 <= bound <= 1.0:
        raise ConfigError(f"invalid config field 'min_metric': {name} lies between 0 and 1, "
                          f"got {bound}")
    if name in LOWER_IS_BETTER and bound <= 0:
        raise ConfigError(f"invalid config field 'min_metric': {name} is above 0, got {bound}")
    return name, bound



@dataclass
class TrainConfig:
    """Everything a training run needs. Field docs are the CLI's help texts."""

    model: Optional[str] = None
    """Hugging Face model id or local folder (config.json + weights + tokenizer)."""
    train: Optional[str] = None
    """Training data: .csv, .tsv, .jsonl, .json (JSON lines or one array of objects) or
    .parquet."""
    eval: Optional[str] = None
    """Evaluation data; when absent, `eval_fraction` of the training data is held out."""
    eval_fraction: float = 0.1
    """Share of the training data held out for evaluation when no --eval file is given."""
    data_streaming: str = "auto"
    """Read and tokenise the data with Ray Data on the cluster and stream it to the
    workers, so that the driver never holds it: on; off (the driver reads and tokenises
    it and sends it to the workers whole); auto: on for a folder, a glob or data of at
    least 64 MiB. --train and --eval then also take a folder of shards or a glob
    (docs/design.md, "Streamed data")."""
    task: str = CLASSIFICATION
    """classification (sequence classifier) or generation (supervised fine-tuning of a
    causal language model on prompt/response pairs)."""
    text_column: Optional[str] = None
    """Column with the text; default: the first of text, sentence, content, review."""
    label_column: Optional[str] = None
    """Column with the label; default: the first of label, labels, category, class."""
    columns: Optional[list[str]] = None
    """Column names for CSV/TSV files without a header row, e.g. [text, label]."""
    prompt_column: Optional[str] = None
    """Generation: column with the prompt; default: the first of prompt, question,
    instruction, input, query (an `instruction` found so gets its record's `input`, when
    not empty, after a blank line: Alpaca's instruction/input/output)."""
    response_column: Optional[str] = None
    """Generation: column with the response; default: the first of response, answer,
    output, completion."""
    prompt_template: Optional[str] = None
    """Generation: how a prompt is shown to the model, with {prompt} where it goes, e.g.
    'Question: {prompt}\\nAnswer: ' (in a flag, \\n and \\t stand for newline and
    tab).
    Saved with the checkpoint; the server applies it. Default: the prompt as is."""
    packing: bool = False
    """Generation: pack several short examples into each training sequence of up to
    max_length tokens (less padding; attention then crosses example boundaries). The
    default max_length (the 99th percentile of example lengths) leaves little room to
    pack: set --max-length to a few times the typical example for it to pack."""
    lora_r: int = 0
    """Generation: LoRA rank (needs the peft package); 0 trains every weight. The
    adapter is merged into the published checkpoint."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.05
    lora_target_modules: Optional[list[str]] = None
    """Modules LoRA adapts, e.g. q_proj,v_proj; default: peft's choice for the model."""
    name: Optional[str] = None
    """Model name in the registry; default: the training file's stem."""
    registry: str = DEFAULT_REGISTRY
    """Registry root folder."""
    runs_dir: str = DEFAULT_RUNS_DIR
    """Where Ray Train keeps run state and checkpoints: a folder every node of the
    cluster mounts, or object storage (s3://bucket/prefix, with the registry's optional
    ?endpoint_override=... query; credentials from each node's AWS_* variables)."""
    run_name: Optional[str] = None
    """The run's folder in runs_dir. A run of this name that did not finish is resumed
    from its last checkpoint (a RayJob retry, a job submitted again); one that finished
    is refused. Default: a new name, <model>-<time>-<random>."""
    workers: int = 1
    """Number of Ray Train workers (data parallel)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker; also the worker's torch thread count."""
    placement_strategy: str = "PACK"
    """How Ray places the workers on the cluster's nodes (the strategy of their
    placement group): PACK (as few nodes as fit, so DDP's all-reduce stays within a
    node where it can), SPREAD (one worker per node where there are nodes enough, else
    shared), STRICT_PACK (all on one node) or STRICT_SPREAD (each on a node of its own;
    after a node is lost the run waits for enough nodes again)."""
    use_gpu: bool = False
    """One GPU per worker, bf16 autocast where supported."""
    strategy: str = "auto"
    """How the workers hold the model: ddp (each worker a whole copy, gradients
    averaged), fsdp (FSDP2: weights, gradients and optimizer state sharded across the
    workers, each layer gathered when it runs; checkpoints sharded during the run, one
    consolidated model published) or auto: ddp on one worker or when the model's
    training state (weights, gradients, AdamW moments) takes at most half of a worker's
    memory (its GPU's, or its share of the node's RAM), else fsdp."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them:
    less memory for about a third more compute (Hugging Face models that support
    gradient checkpointing)."""
    epochs: Optional[int] = None
    """Passes over the training data. Default: 3 for classification, 2 for generation
    (docs/quality.md says why)."""
    batch_size: int = 32
    """Global batch size per optimizer step, split across workers and accumulation steps."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step on each worker."""
    group_by_length: Optional[bool] = None
    """Batch examples of similar token length together (sorted within groups of 64
    batches, the batches in random order), so that batches padded to their longest
    example carry little padding. Default: on for classification, off for generation
    (where --packing removes padding instead)."""
    learning_rate: Optional[float] = None
    """Peak learning rate (AdamW). Default: 5e-5 for classification, 2e-5 for full
    generation fine-tuning, 2e-4 with LoRA."""
    weight_decay: float = 0.01
    warmup_ratio: Optional[float] = None
    """Share of all optimizer steps spent warming the learning rate up from 0.
    Default: 0.06 for classification, 0.03 for generation."""
    max_length: Optional[int] = None
    """Maximum tokens per example; longer texts are truncated. Default: from the
    training data, the 99th percentile of token lengths rounded up to a multiple of 8,
    at most the model's limit (and 1024 for generation)."""
    eval_steps: Optional[int] = None
    """Also evaluate and checkpoint every N optimizer steps (default: at the end of each
    epoch only). A failed worker resumes from the last checkpoint."""
    max_steps: Optional[int] = None
    """End the run after at most N optimizer steps in all, counted across epochs (the
    learning rate decays to 0 there); it then evaluates and publishes the best
    checkpoint as usual. For smoke runs on big data. Default: no bound."""
    search: bool = False
    """Search the learning rate, epochs and warmup with Ray Tune: --search-trials runs
    train in parallel on the cluster (each with --workers workers), ASHA stops the weak
    ones early, and the best trial's best checkpoint is published as one version (its
    manifest's `search` lists every trial, its settings and metrics)."""
    search_trials: int = 4
    """With --search: how many settings to try (the first is the run's own)."""
    search_time_budget_s: Optional[float] = None
    """With --search: stop every trial after this many seconds in all and publish the
    best checkpoint so far. Default: no limit."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations in a row without the eval metric improving by
    more than early_stopping_min_delta; the best checkpoint is published. 0: off."""
    early_stopping_min_delta: float = 0.0
    """Smallest change of the eval metric that counts as an improvement."""
    class_weights: Optional[str] = None
    """Classification: loss weights per class, 'balanced' (n / (classes x count), for
    imbalanced labels) or label=weight pairs, e.g. 'spam=3,ham=1'. Default: none."""
    pooling: str = "auto"
    """Classification: how the encoder's token states become one vector per text: mean
    (their masked mean, as sentence-transformers encoders are trained), cls (the
    model's own head), or auto: mean for a sentence-transformers model (its
    1_Pooling/config.json says mean tokens), else cls. Saved with the checkpoint;
    serving and eval apply it."""
    small_data: str = "auto"
    """Classification: settings for a small training set: enough optimizer steps
    whatever its size (more epochs), a learning rate for them and a faster-learning
    head. auto: on below 5,000 training rows; on; off. Fields given explicitly
    (--epochs, --learning-rate, --warmup-ratio, --head-learning-rate) are kept."""
    head_learning_rate: Optional[float] = None
    """Classification: peak learning rate of the new classification head. Default:
    1e-3 with small-data settings, else --learning-rate."""
    max_failures: int = 1
    """Worker failures (process or node lost) tolerated; after each, training resumes
    from the last checkpoint. More than this and the run fails."""
    max_grad_norm: float = 1.0
    seed: int = 42
    log_every_steps: int = 10
    """How often workers report progress (loss, samples/s) to the driver."""
    address: Optional[str] = None
    """Ray cluster address; default: start a local cluster in-process."""
    promote: bool = False
    """After publishing, promote to production if its eval metric is at least as good as
    production's: a classifier's accuracy, both scored on this run's eval rows; a
    generator's eval loss, as each run recorded it."""
    min_metric: Optional[str] = None
    """With --promote: also require e.g. accuracy=0.85."""
    rollout: Optional[str] = None
    """canary: after publishing, roll the new version out as `tuneserve models rollout`
    does instead of promoting it: a canary beside production at the first of
    rollout_steps, stepped up while its error ratio and p99 latency hold against
    production's over each step, promoted after the last, rolled back at the first that
    fails (with --promote, only a version that passes its gate goes out). Needs
    rollout_metrics_url. A model's first version has no production to compare with and
    becomes production as without it. Default: no rollout."""
    rollout_metrics_url: Optional[list[str]] = None
    """With --rollout canary: the serving cluster's Ray metrics endpoints,
    http://HOST:PORT/metrics, one per node that serves (`tuneserve serve --metrics-port`;
    port 8080 of each serving pod on Kubernetes)."""
    rollout_steps: Optional[str] = None
    """With --rollout canary: the candidate's share at each step, in percent, e.g.
    5,25,50 (promoted after the last). Default: 5,25,50."""
    rollout_min_requests: Optional[int] = None
    """With --rollout canary: the candidate's requests in a step before it is judged.
    Default: 100."""
    rollout_min_step_s: Optional[float] = None
    """With --rollout canary: the shortest time a step lasts. Default: 60."""
    rollout_max_step_s: Optional[float] = None
    """With --rollout canary: a step without rollout_min_requests in this long rolls the
    candidate back. Default: 1800."""
    rollout_poll_s: Optional[float] = None
    """With --rollout canary: how often the serving metrics are read. Default: 5."""
    rollout_p99_factor: Optional[float] = None
    """With --rollout canary: a step fails when the candidate's p99 latency is above this
    times production's plus rollout_p99_slack_s. Default: 1.5."""
    rollout_p99_slack_s: Optional[float] = None
    """With --rollout canary: see rollout_p99_factor. Default: 0.01."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes kept in the manifest."""

    def resolve(self) -> "ResolvedTrainConfig":
        """The checked run config: a new frozen ResolvedTrainConfig with the task's
        defaults filled in and the model name derived from the training file. This
        input is left as it is. ConfigError names the first bad field."""
        _check_required(self)
        resolved = dataclasses.replace(
            ResolvedTrainConfig.from_flat(_resolved_values(self)),
            defaulted=tuple(name for name in ("epochs", "learning_rate", "warmup_ratio")
                            if getattr(self, name) is None))
        for check in TRAIN_CHECKS:
            check(resolved)
        return resolved

    def validate(self) -> "ResolvedTrainConfig":
        """resolve() by its older name: use the config it returns."""
        return self.resolve()
    @property
    def micro_batch_size(self) -> int:
        """Examples per forward pass on one worker."""
        return self.batch_size // (self.workers * self.grad_accum_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = set(cls.field_names())
        unknown = sorted(k for k in data if k.replace("-", "_") not in known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown config field(s) {', '.join(map(repr, unknown))}; "
                f"known fields: {', '.join(sorted(known))}"
            )
        values = {}
        for key, value in data.items():
            key = key.replace("-", "_")
            values[key] = _coerce(cls, key, value, source)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(load_yaml_mapping(path), source=str(path))

    def merged(self, overrides: dict[str, Any]) -> "TrainConfig":
        """A copy with every non-None override applied."""
        data = self.to_dict()
        data.update({k: v for k, v in overrides.items() if v is not None})
        return TrainConfig.from_dict(data, source="command line")


def _bad(name: str, why: str) -> ConfigError:
    return ConfigError(f"invalid config field '{name}': {why}")


def _check_required(cfg: TrainConfig) -> None:
    """What resolving needs: a model, a training file and a known task."""
    if not cfg.model:
        raise _bad("model", "required (a Hugging Face model id or a local folder)")
    if not cfg.train:
        raise _bad("train", "required (path of the training data file)")
    if cfg.task not in TASKS:
        raise _bad("task", f"must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    if not (0.0 < cfg.eval_fraction < 1.0):
        raise _bad("eval_fraction", f"must be between 0 and 1, got {cfg.eval_fraction}")


def _names(value: Any) -> Any:
    """A list-of-names field as a tuple ('a, b' in a flag or YAML is a list too); any
    other value as it is, for the checks to refuse."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(","))
    return tuple(value) if isinstance(value, list) else value


def _resolved_values(cfg: TrainConfig) -> dict[str, Any]:
    """The input's fields, copied, with the task's defaults for those left unset, the
    lists as tuples and the model name defaulting to the training file's stem."""
    values = {f.name: copy.deepcopy(getattr(cfg, f.name)) for f in fields(cfg)}
    values.update(TASK_DEFAULTS[cfg.task].fill(values))
    values["columns"] = _names(values["columns"])
    values["lora_target_modules"] = _names(values["lora_target_modules"])
    values["rollout_metrics_url"] = _names(values["rollout_metrics_url"])
    if values["name"] is None:
        values["name"] = Path(cfg.train).stem
    return values


def _check_finite(r: "ResolvedTrainConfig") -> None:
    """nan passes every comparison of the checks below; inf is no setting."""
    for name in TrainConfig.field_names():
        value = getattr(r, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise _bad(name, f"must be a finite number, got {value}")


def _check_integers(r: "ResolvedTrainConfig") -> None:
    for name in ("workers", "epochs", "batch_size", "grad_accum_steps", "max_length",
                 "log_every_steps", "eval_steps", "max_steps", "search_trials"):
        value = getattr(r, name)
        if name in ("max_length", "eval_steps", "max_steps") and value is None:
            continue
        if not _is_int(value) or value < 1:
            raise _bad(name, f"must be a positive integer, got {value!r}")
    if r.max_length is not None and r.max_length < 8:
        raise _bad("max_length", f"must be at least 8, got {r.max_length}")
    for name in ("early_stopping_patience", "max_failures", "seed"):
        value = getattr(r, name)
        if not _is_int(value) or value < 0:
            raise _bad(name, f"must be an integer >= 0, got {value!r}")
    if r.seed > SEED_MAX:  # torch.manual_seed would fail in every worker
        raise _bad("seed", f"must be at most {SEED_MAX} (2**64 - 1), got {r.seed}")


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
"""Ray placement group strategies for the training workers (TrainConfig.placement_strategy)."""


def _check_ranges(r: "ResolvedTrainConfig") -> None:
    if r.early_stopping_min_delta < 0:
        raise _bad("early_stopping_min_delta", f"must be >= 0, got {r.early_stopping_min_delta}")
    if r.class_weights is not None:
        if r.task != CLASSIFICATION:
            raise _bad("class_weights", f"applies to --task {CLASSIFICATION} only")
        parse_class_weights(r.class_weights)
    if r.cpus_per_worker <= 0:
        raise _bad("cpus_per_worker", f"must be > 0, got {r.cpus_per_worker}")
    if r.placement_strategy not in PLACEMENT_STRATEGIES:
        raise _bad("placement_strategy", f"must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                   f"got {r.placement_strategy!r}")
    if not (0.0 < r.learning_rate < 1.0):
        raise _bad("learning_rate", f"must be in (0, 1), got {r.learning_rate}")
    if not (0.0 <= r.weight_decay < 1.0):
        raise _bad("weight_decay", f"must be in [0, 1), got {r.weight_decay}")
    if not (0.0 <= r.warmup_ratio < 1.0):
        raise _bad("warmup_ratio", f"must be in [0, 1), got {r.warmup_ratio}")
    if r.max_grad_norm <= 0:
        raise _bad("max_grad_norm", f"must be > 0, got {r.max_grad_norm}")
    if r.search_time_budget_s is not None and r.search_time_budget_s <= 0:
        raise _bad("search_time_budget_s", f"must be > 0, got {r.search_time_budget_s}")


def _check_strategy(r: "ResolvedTrainConfig") -> None:
    if r.strategy not in STRATEGIES:
        raise _bad("strategy", f"must be one of {', '.join(STRATEGIES)}, got {r.strategy!r}")
    if r.strategy == "fsdp" and r.workers < 2:
        raise _bad("strategy", "fsdp shards the model across workers and one worker has "
                   "nothing to share it with: use --workers 2 or more, or --strategy ddp")


SMALL_DATA_MODES = ("auto", "on", "off")
DATA_STREAMING_MODES = ("auto", "on", "off")


def _check_data_streaming(r: "ResolvedTrainConfig") -> None:
    if r.data_streaming not in DATA_STREAMING_MODES:
        raise _bad("data_streaming", f"must be one of {', '.join(DATA_STREAMING_MODES)}, "
                   f"got {r.data_streaming!r}")
    if r.data_streaming == "on" and r.search:
        raise _bad("data_streaming", "--search trains on data in memory: use "
                   "--data-streaming off or auto with --search")


def _check_small_data(r: "ResolvedTrainConfig") -> None:
    if r.pooling not in POOLINGS:
        raise _bad("pooling", f"must be one of {', '.join(POOLINGS)}, got {r.pooling!r}")
    if r.small_data not in SMALL_DATA_MODES:
        raise _bad("small_data", f"must be one of {', '.join(SMALL_DATA_MODES)}, "
                   f"got {r.small_data!r}")
    for name, off in (("pooling", "auto"), ("small_data", "auto"),
                      ("head_learning_rate", None)):
        if getattr(r, name) != off and r.task != CLASSIFICATION:
            raise _bad(name, f"applies to --task {CLASSIFICATION} only")
    if r.head_learning_rate is not None and not 0.0 < r.head_learning_rate < 1.0:
        raise _bad("head_learning_rate", f"must be in (0, 1), got {r.head_learning_rate}")


def _check_batch_split(r: "ResolvedTrainConfig") -> None:
    per_step = r.workers * r.grad_accum_steps
    if r.batch_size % per_step:
        raise _bad("batch_size", f"{r.batch_size} is not divisible by workers x "
                   f"grad_accum_steps ({r.workers} x {r.grad_accum_steps} = {per_step})")


def _check_prompt_template(r: "ResolvedTrainConfig") -> None:
    template = r.prompt_template
    if template is None:
        return
    if r.task != GENERATION:
        raise _bad("prompt_template", f"applies to --task {GENERATION} only")
    try:
        rendered = render_prompt(template, "\x00")
    except (KeyError, IndexError, ValueError) as exc:
        raise _bad("prompt_template", f"must contain {{prompt}} and no other {{...}} field "
                   f"(write {{{{ and }}}} for literal braces): {exc!r}")
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is not None and (name != "prompt" or spec or conversion):
            raise _bad("prompt_template", f"write {{prompt}} as it is, without an index, "
                       f"attribute, format or conversion (got {{{name}"
                       f"{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}})")
    if rendered.count("\x00") != 1:
        raise _bad("prompt_template", "must contain {prompt} exactly once")


def _check_packing(r: "ResolvedTrainConfig") -> None:
    if r.packing and r.task != GENERATION:
        raise _bad("packing", f"applies to --task {GENERATION} only")


def _check_lora(r: "ResolvedTrainConfig") -> None:
    if not _is_int(r.lora_r) or r.lora_r < 0:
        raise _bad("lora_r", f"must be an integer >= 0, got {r.lora_r!r}")
    if not r.lora_r:
        return
    if r.task != GENERATION:
        raise _bad("lora_r", f"LoRA applies to --task {GENERATION} only")
    if r.lora_alpha <= 0:
        raise _bad("lora_alpha", f"must be > 0, got {r.lora_alpha}")
    if not (0.0 <= r.lora_dropout < 1.0):
        raise _bad("lora_dropout", f"must be in [0, 1), got {r.lora_dropout}")
    targets = r.lora_target_modules
    if targets is not None:
        _check_names("lora_target_modules", targets)
        if not targets or any(not m for m in targets):
            raise _bad("lora_target_modules", "must be a comma-separated list of names")


def _check_columns(r: "ResolvedTrainConfig") -> None:
    columns = r.columns
    if columns is not None:
        _check_names("columns", columns)
        if not columns or any(not c for c in columns):
            raise _bad("columns", "must be a comma-separated list of column names")
        twice = sorted({c for c in columns if columns.count(c) > 1})
        if twice:
            raise _bad("columns", f"names a column twice: {', '.join(twice)}")
    for a, b in (("text_column", "label_column"), ("prompt_column", "response_column")):
        if getattr(r, a) and getattr(r, a) == getattr(r, b):
            raise _bad(b, f"is the same column as {a} ({getattr(r, a)!r})")


def _check_name(r: "ResolvedTrainConfig") -> None:
    try:
        validate_name(r.name, "model")
    except Exception as exc:
        raise _bad("name", str(exc)) from None
    if r.run_name is not None:
        try:
            validate_name(r.run_name, "run")
        except Exception as exc:
            raise _bad("run_name", str(exc)) from None


def _check_promotion(r: "ResolvedTrainConfig") -> None:
    if r.min_metric:
        check_min_metric(r.min_metric, r.task)
        if not r.promote:
            raise _bad("min_metric", "is the threshold of --promote: pass --promote too "
                       "(or drop min_metric)")


ROLLOUTS = ("canary",)
ROLLOUT_FIELDS = ("rollout_metrics_url", "rollout_steps", "rollout_min_requests",
                  "rollout_min_step_s", "rollout_max_step_s", "rollout_poll_s",
                  "rollout_p99_factor", "rollout_p99_slack_s")
"""The settings of --rollout canary; each maps to the RolloutPolicy field it names
less its `rollout_` (rollout_metrics_url excepted)."""


def rollout_policy(r: "ResolvedTrainConfig | TrainConfig"):
    """The RolloutPolicy of a run's rollout_* fields (RolloutPolicy's defaults for those
    unset); ConfigError names the field."""
    from services.core.analysis import RolloutPolicy

    given: dict[str, Any] = {}
    if r.rollout_steps is not None:
        try:
            given["steps"] = tuple(float(s) for s in str(r.rollout_steps).split(","))
        except ValueError:
            raise _bad("rollout_steps", f"expected shares in percent like 5,25,50, got "
                       f"{r.rollout_steps!r}") from None
    for name in ROLLOUT_FIELDS[2:]:
        if getattr(r, name) is not None:
            given[name.removeprefix("rollout_")] = getattr(r, name)
    try:
        return RolloutPolicy(**given)
    except ValueError as exc:  # "<field>: what it expects"
        field_name, _, expected = str(exc).partition(": ")
        raise _bad(f"rollout_{field_name}", expected) from None


def _check_rollout(r: "ResolvedTrainConfig") -> None:
    if r.rollout is None:
        given = [name for name in ROLLOUT_FIELDS if getattr(r, name) is not None]
        if given:
            raise _bad(given[0], "is a setting of --rollout canary: pass --rollout canary "
                       "too (or drop it)")
        return
    if r.rollout not in ROLLOUTS:
        raise _bad("rollout", f"must be one of {', '.join(ROLLOUTS)} (or left out for no "
                   f"rollout), got {r.rollout!r}")
    urls = r.rollout_metrics_url
    if not urls:
        raise _bad("rollout_metrics_url", "required with --rollout canary: the serving "
                   "cluster's Ray metrics endpoints, http://HOST:PORT/metrics, one per node "
                   "that serves (`tuneserve serve --metrics-port`; port 8080 of each serving "
                   "pod on Kubernetes)")
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise _bad("rollout_metrics_url", f"expected http://HOST:PORT/metrics, got "
                       f"{url!r}")
    rollout_policy(r)


def _check_extra(r: "ResolvedTrainConfig") -> None:
    if r.extra:
        try:
            json.dumps(r.extra, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise _bad("extra", f"must hold plain values (text, numbers, lists, mappings) "
                       f"as the manifest is JSON: {exc}") from None


TRAIN_CHECKS: tuple[Callable[["ResolvedTrainConfig"], None], ...] = (
    _check_finite, _check_integers, _check_ranges, _check_strategy, _check_batch_split,
    _check_prompt_template, _check_packing, _check_lora, _check_columns, _check_name, _check_promotion,
    _check_extra, _check_small_data, _check_rollout, _check_data_streaming)
"""The checks of a resolved config, in the order its fields are reported."""


@dataclass(frozen=True)
class DataSection:
    """What is read, how it is split for eval and how it is tokenised."""

    train: str
    eval: Optional[str]
    eval_fraction: float
    data_streaming: str
    text_column: Optional[str]
    label_column: Optional[str]
    columns: Optional[tuple[str, ...]]
    prompt_column: Optional[str]
    response_column: Optional[str]
    prompt_template: Optional[str]
    packing: bool
    max_length: Optional[int]
    """None until the training data chose it (ResolvedTrainConfig.with_max_length)."""


@dataclass(frozen=True)
class ModelSection:
    """The base model and how it is adapted (LoRA)."""

    model: str
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    lora_target_modules: Optional[tuple[str, ...]]
    pooling: str
    """auto until the model's files chose it (ResolvedTrainConfig.with_choices)."""


@dataclass(frozen=True)
class OptimSection:
    """The optimisation: schedule, batches, loss weights, seed and evaluation."""

    epochs: int
    batch_size: int
    grad_accum_steps: int
    group_by_length: bool
    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    max_grad_norm: float
    class_weights: Optional[str]
    seed: int
    eval_steps: Optional[int]
    max_steps: Optional[int]
    early_stopping_patience: int
    early_stopping_min_delta: float
    small_data: str
    head_learning_rate: Optional[float]


@dataclass(frozen=True)
class ClusterSection:
    """Where the run goes: Ray workers, their resources and how they hold the model,
    run state, reporting."""

    workers: int
    cpus_per_worker: float
    placement_strategy: str
    use_gpu: bool
    strategy: str
    activation_checkpointing: bool
    address: Optional[str]
    runs_dir: str
    run_name: Optional[str]
    max_failures: int
    log_every_steps: int


@dataclass(frozen=True)
class SearchSection:
    """The hyperparameter search with Ray Tune (services/training/search.py), if any."""

    search: bool
    search_trials: int
    search_time_budget_s: Optional[float]


@dataclass(frozen=True)
class PublishSection:
    """What the registry gets: the model name, the registry and the promotion gate."""

    name: str
    registry: str
    promote: bool
    min_metric: Optional[str]
    extra: dict[str, Any]


@dataclass(frozen=True)
class RolloutSection:
    """What follows the publish: a canary rollout and its policy (`rollout_policy`)."""

    rollout: Optional[str]
    rollout_metrics_url: Optional[tuple[str, ...]]
    rollout_steps: Optional[str]
    rollout_min_requests: Optional[int]
    rollout_min_step_s: Optional[float]
    rollout_max_step_s: Optional[float]
    rollout_poll_s: Optional[float]
    rollout_p99_factor: Optional[float]
    rollout_p99_slack_s: Optional[float]


SECTIONS = (("data", DataSection), ("modeling", ModelSection), ("optim", OptimSection),
            ("cluster", ClusterSection), ("tuning", SearchSection),
            ("publish", PublishSection), ("release", RolloutSection))
"""ResolvedTrainConfig's sections; together with `task` they hold every TrainConfig
field exactly once."""


@dataclass(frozen=True)
class ResolvedTrainConfig:
    """A checked run config (TrainConfig.resolve()), grouped and frozen. Every
    TrainConfig field also reads flat (`cfg.epochs`, lists as lists) for the callers
    that know the input's names."""

    task: str
    data: DataSection
    modeling: ModelSection
    optim: OptimSection
    cluster: ClusterSection
    tuning: SearchSection
    publish: PublishSection
    release: RolloutSection
    defaulted: tuple[str, ...] = field(default=(), compare=False)
    """The fields the task's defaults filled in (not given by the user): what the
    small-data settings may change."""

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> "ResolvedTrainConfig":
        """From flat TrainConfig field values (unchecked: TrainConfig.resolve checks)."""
        return cls(task=values["task"], **{
            name: section(**{f.name: values[f.name] for f in fields(section)})
            for name, section in SECTIONS})

    @property
    def task_defaults(self) -> TaskDefaults:
        return TASK_DEFAULTS[self.task]

    @property
    def micro_batch_size(self) -> int:
        """Examples per forward pass on one worker."""
        return self.optim.batch_size // (self.cluster.workers * self.optim.grad_accum_steps)

    def with_choices(self, pooling: str, **optim: Any) -> "ResolvedTrainConfig":
        """A copy with the pooling and optimizer fields chosen from the model and data."""
        return dataclasses.replace(
            self, modeling=dataclasses.replace(self.modeling, pooling=pooling),
            optim=dataclasses.replace(self.optim, **optim))

    def with_max_length(self, max_length: int) -> "ResolvedTrainConfig":
        """A copy with the max_length the training data chose."""
        return dataclasses.replace(
            self, data=dataclasses.replace(self.data, max_length=max_length))

    def to_dict(self) -> dict[str, Any]:
        """The flat fields in TrainConfig's order, as a TrainConfig's to_dict gives them:
        the run folder's and the manifest's `config` (TrainConfig.from_dict reads it)."""
        return {name: copy.deepcopy(getattr(self, name)) for name in TrainConfig.field_names()}

    def resolve(self) -> "ResolvedTrainConfig":
        """Already resolved: itself."""
        return self

    validate = resolve


def _flat_field(section: str, name: str) -> property:
    def get(self: ResolvedTrainConfig) -> Any:
        value = getattr(getattr(self, section), name)
        return list(value) if isinstance(value, tuple) else value

    return property(get, doc=f"{section}.{name}, as TrainConfig names it.")


for _section, _cls in SECTIONS:
    for _field in fields(_cls):
        setattr(ResolvedTrainConfig, _field.name, _flat_field(_section, _field.name))
del _section, _cls, _field

def _check_names(name: str, value: Any) -> None:
    """A list-of-text field holds text only (YAML reads `[1, 2]` as numbers)."""
    if not isinstance(value, list):
        raise _bad(name, f"must be a list of names, got {type(value).__name__} {value!r}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _bad(name, f"must be a list of names (text); item {i + 1} is "
                      f"{type(item).__name__} {item!r}")


def parse_class_weights(spec: str) -> "str | dict[str, float]":
    """'balanced' or {label: weight} from 'a=2,b=1'; ConfigError naming the field."""
    spec = spec.strip()
    if spec == "balanced":
        return spec
    weights: dict[str, float] = {}
    for part in spec.split(","):
        if part.strip() == "balanced":
            raise ConfigError("invalid config field 'class_weights': 'balanced' stands alone; "
                              f"it cannot be combined with label=weight pairs ({spec!r})")
        label, sep, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not label.strip() or not weight > 0 or weight == float("inf"):
            raise ConfigError(
                f"invalid config field 'class_weights': expected 'balanced' or "
                f"label=weight pairs with weights > 0, e.g. 'spam=3,ham=1'; got {part!r}")
        weights[label.strip()] = weight
    return weights


def render_prompt(template: Optional[str], prompt: str) -> str:
    """The text the model sees for a prompt: the same at training and serving time."""
    return prompt if template is None else template.format(prompt=prompt)


def template_from_flag(value: str) -> str:
    """A prompt template given as a shell flag, which cannot easily hold a newline:
    `\\n` and `\\t` in it stand for a newline and a tab."""
    return value.replace("\\n", "\n").replace("\\t", "\t")


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(key)
        self.key, self.line, self.first_line = key, line, first_line


class _ConfigLoader(yaml.SafeLoader):
    """Safe YAML, but a date stays the text written (configs are saved as JSON), and a
    key given twice in one mapping is an error (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` overrides
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable: the base class says so
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise _DuplicateKey(key, line, first)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it: {exc.strerror or exc}") \
            from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} "
                          f"at offset {exc.start}); save it as UTF-8 YAML") from None
    try:
        data = yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        why = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML: {why}") from None
    except _DuplicateKey as exc:
        raise ConfigError(f"{path} (line {exc.line}): {exc.key!r} is given twice (first on "
                          f"line {exc.first_line}); keep one") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value at the top level")
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        raise ConfigError(f"{path}: field names must be text, got {odd[0]!r}")
    spelled: dict[str, str] = {}
    for key in data:  # eval-fraction and eval_fraction name one field
        field_name = key.replace("-", "_")
        if field_name in spelled:
            raise ConfigError(f"{path}: {spelled[field_name]!r} and {key!r} are the same "
                              f"field ({field_name}); keep one")
        spelled[field_name] = key
    return data


def _coerce(cls: type, key: str, value: Any, source: str) -> Any:
    """Check a YAML value against the field's declared type, converting int -> float."""
    by_name = {f.name: f for f in fields(cls)}
    hint = str(by_name[key].type)
    if value is None:
        if "Optional" in hint or "None" in hint:
            return None
        default = by_name[key].default
        shown = "" if default is dataclasses.MISSING else f" ({default!r})"
        raise ConfigError(f"{source}: invalid config field '{key}': null is not a value here; "
                          f"leave the field out for its default{shown}")
    expect: tuple[type, ...]
    if "bool" in hint:
        expect = (bool,)
    elif "float" in hint:
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                pass
        expect = (float,)
    elif "int" in hint:
        expect = (int,)
    elif "list" in hint:
        if isinstance(value, str):
            value = [c.strip() for c in value.split(",")]
        if isinstance(value, list):  # every list field is a list of names
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    raise ConfigError(
                        f"{source}: invalid config field '{key}': expected a list of "
                        f"names (text); item {i + 1} is {type(item).__name__} {item!r}")
        expect = (list,)
    elif "dict" in hint:
        expect = (dict,)
    else:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        expect = (str,)
    if not isinstance(value, expect) or (expect == (int,) and isinstance(value, bool)):
        raise ConfigError(
            f"{source}: invalid config field '{key}': expected {expect[0].__name__}, "
            f"got {type(value).__name__} {value!r}"
        )
    return value


@dataclass
class ServeLimits:
    """Request limits enforced by the gRPC ingress (all configurable)."""

    max_texts_per_request: int = 128
    max_text_chars: int = 20_000
    max_model_name_chars: int = 128
    max_prompt_chars: int = 20_000
    """Generation: characters per prompt (the model's context is checked in tokens)."""
    default_max_new_tokens: int = 128
    """Generation: max_new_tokens when a request leaves it unset."""
    max_new_tokens: int = 1024
    """Generation: the largest max_new_tokens a request may ask for."""
    max_stop_sequences: int = 4
    max_stop_chars: int = 64
    """Generation: characters per stop string."""
    max_request_bytes: int = 16 * 1024 * 1024
    """Serialized size of one request message; past it, RESOURCE_EXHAUSTED. The
    default fits the largest valid Classify request (128 texts of 20,000 four-byte
    characters, about 10 MiB). Every gRPC server (Serve's proxy too) refuses a message
    over twice this from its length prefix, before reading it."""
    request_timeout_s: int = 120
    """The deadline of a unary call that carries none (DEADLINE_EXCEEDED past it);
    behind Serve's proxy, which passes no deadline on, of every unary call."""
    max_watch_streams: int = 64
    """Health Watch streams one ingress replica holds open at once (they need no
    token); past it, a new one is RESOURCE_EXHAUSTED. Kept under the ingress's
    max_ongoing_requests, so that Watch streams cannot take every slot."""
    max_watch_streams_per_connection: int = 4
    """Health Watch streams one connection may hold open at once (by the call's peer,
    which Serve's proxy passes on too)."""


SERVING_DTYPES = ("auto", "float32", "bfloat16", "float16")
"""What `ServeConfig.dtype` may name (services.core.modeling.serving_dtype)."""
GENERATION_BATCHING = ("continuous", "static")
CLASSIFIER_OPTIMIZERS = ("onnx", "onnx-int8", "bf16", "auto")
"""ServeConfig.optimize: ONNX Runtime with the model's float32 weights, or with int8
weights (per output channel) for its linear layers; the weights in bfloat16 as a
TorchScript trace, where the CPU or GPU computes bfloat16 natively; auto: bf16 where
it does, else none (services/runtime/optimized.py)."""
BF16_OPTIMIZERS = ("bf16", "auto")
"""The ServeConfig.optimize values that check bfloat16 weights against the float32
model (loaded in float32 for that)."""
"""What `ServeConfig.generation_batching` may name."""


@dataclass
class ServeConfig:
    """What `tuneserve serve` needs."""

    registry: str = DEFAULT_REGISTRY
    grpc_port: int = 9000
    host: str = "0.0.0.0"
    metrics_port: Optional[int] = None
    address: Optional[str] = None
    channel: str = "production"
    poll_interval_s: float = 2.0
    """How often each replica checks the registry for a moved channel."""
    replica_cpus: float = 1.0
    """CPUs reserved per model replica; also its torch thread count (rounded up)."""
    replica_gpus: float = 0.0
    """GPUs per model replica (the model moves to CUDA when it has one)."""
    ingress_cpus: float = 0.1
    ingress_replicas: int = 1
    """Replicas of the ingress (the default layout; with colocate, num_replicas sizes the
    ingress). Two or more on different nodes keep the API answering when a node is lost."""
    num_replicas: int = 1
    """Fixed replicas per model when autoscaling is off (max_replicas unset)."""
    min_replicas: Optional[int] = None
    """Autoscaling lower bound (default 1 when max_replicas is set)."""
    max_replicas: Optional[int] = None
    """Setting this turns Serve autoscaling on for every model deployment."""
    target_ongoing_requests: float = 2.0
    """Autoscaling target: requests in flight per replica."""
    upscale_delay_s: float = 3.0
    downscale_delay_s: float = 30.0
    autoscaling_overrides: dict[str, Any] = field(default_factory=dict)
    """Any other Serve AutoscalingConfig field, e.g. look_back_period_s."""
    max_ongoing_requests: Optional[int] = None
    """Requests one replica works on at once (it batches them); more wait in Serve's
    router, up to max_queued_requests. Default: 2 x max_batch_size for classifiers (a
    batch computing and the next one queued in the replica), 8 for generators (a
    generation batch runs to its longest request)."""
    max_queued_requests: int = 256
    """Requests waiting beyond that (Classify: in the ingress for room in a coalesced
    call; otherwise in Serve's router, per caller); past it, RESOURCE_EXHAUSTED. -1: no
    bound. The ingress deployment's own queue is bounded by the larger of this and the
    requests it holds at once."""
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.0
    """Classifiers: how long an idle replica waits for a batch to fill (a lone request
    waits a quarter of it for a second one, and only then the rest; see
    services/serving/batching.py). A batch starts as soon as the model is free with
    every request queued by then, so batches grow with the load without any wait; a
    wait only pays where a larger batch costs little more than a small one (a GPU). At
    0 a replica still waits briefly for the callers of the batch that just ended (at
    most a quarter of its compute time and 50 ms), so clients that call one after
    another stay one batch; a lone caller never waits, and where callers do not come
    back the wait backs off."""
    coalesce: bool = True
    """Classifiers: the ingress sends concurrent Classify requests to a model together,
    in one call per batch (at most 2 calls per replica in flight, each carrying at
    most max_batch_size requests, max_ongoing_requests per replica in all), instead
    of one call each: a call costs CPU in every process it crosses, more than a short
    text costs the model. Requests waiting for room count against max_queued_requests."""
    direct_ingress: bool = False
    """Ray Serve's direct ingress (experimental in Ray Serve): the ingress replica itself
    listens on grpc_port, with no proxy hop in front of it; Serve's proxy runs on the
    head node only, on another port. Fewer hops: more throughput and less latency per
    call (docs/benchmarks.md). Ray reads the switch when a cluster starts, so it works
    where tuneserve starts the cluster (`tuneserve serve`, no --address); a cluster of
    your own needs `services.serving.app.direct_ingress_env(port)` in its environment.
    One ingress replica per node. Not for KubeRay's RayService, whose Service routes to
    Serve's proxy."""
    colocate: bool = False
    """Each model runs inside the ingress replicas instead of in a deployment of its own:
    one process answers gRPC and runs the model, so a request crosses no Ray call
    between them (docs/benchmarks.md: less latency and CPU per request). The replica
    settings (num_replicas, autoscaling, replica_cpus, replica_gpus, max_ongoing_requests)
    then apply to the ingress, which loads every served model, and ingress_cpus is
    unused. With direct_ingress: one replica (it listens on grpc_port itself)."""
    replica_grpc: bool = False
    """Each ingress replica answers gRPC on grpc_port with a server of its own
    (services/serving/replica_grpc.py): no proxy hop, and the replicas of a node share
    the port (the kernel spreads connections among them), so with colocate and
    num_replicas > 1 several model processes serve one port (docs/benchmarks.md).
    Clients need several connections to reach several replicas. Serve's proxy answers the same methods on another port
    (`tuneserve serve` picks a free one; in a Serve config or RayService, give
    grpc_options a port other than grpc_port). Works on any cluster, nothing to set
    when it starts. Not with direct_ingress. Autoscaling (max_replicas) works: the
    model deployments scale on the ingress's calls to them, and with colocate the
    ingress replicas report the calls their servers answer to Serve's autoscaler
    (services/serving/autoscale.py)."""
    access_log: bool = True
    """Serve's access log: a line per request in each replica's log. It costs CPU on
    every request (docs/benchmarks.md); tuneserve's own request metrics count every
    call either way."""
    generation_batching: str = "continuous"
    """How a generator replica batches requests. continuous: a request joins the running
    batch at its next decoding step and leaves it as soon as it ends, so nobody waits
    for a batch to finish (services/runtime/continuous.py); a version whose model cannot be
    batched so (a sliding-window cache, or tokens that differ from a static batch's
    in a check at load) gets static batches, with a warning. static: one Hugging Face
    `generate` call per batch, which runs until its longest request ends."""
    generation_batch_wait_timeout_s: float = 0.02
    """Continuous batching: a lone request that finds the replica idle starts at once;
    where two or more are already waiting when it goes idle (a burst), they wait up
    to this for the rest of the burst, so that its prompts go through the model in one
    pass; requests that come while others decode or prefill join at the next step
    without waiting.
    Static batches: how long a request waits for others to join its batch. A batch runs
    until its longest request ends and later requests wait for it, so waiting a little
    for concurrent requests to join pays. A lone request waits a quarter of it for a
    second one, and only with one waits the rest; after a request just missed a lone
    request's batch, lone requests wait all of it for a while
    (services/serving/batching.py). What a request waits adds to its time to first
    token."""
    dtype: str = "auto"
    """What a model replica holds its weights in: float32, bfloat16, float16 (a GPU
    only) or auto (bfloat16 on a GPU that computes it natively, else float32). On a
    CPU with native bfloat16 (AVX512-BF16 or AMX), bfloat16 serves more texts per
    second; scores then differ from float32 in the third decimal (docs/benchmarks.md)."""
    trace: bool = True
    """Classifiers run as a TorchScript trace of the model, made at load and checked
    against the model on sample texts (the model itself serves where tracing fails or
    differs): the whole forward pass in C++, without the model's Python and without
    holding the GIL, so the replica's gRPC work and the model run side by side
    (docs/benchmarks.md)."""
    max_input_tokens: Optional[int] = None
    """Classifiers: the most tokens a text runs on (default: the model's own limit, e.g.
    512; a higher value is the model's limit). A longer text is truncated, counted in
    tuneserve_truncated_inputs_total, or refused (truncation)."""
    truncation: str = "truncate"
    """Classifiers, a text over the limit: truncate (run its first tokens) or refuse
    (its request fails with INVALID_ARGUMENT naming the text and its length)."""
    optimize: Optional[str] = None
    """Classifiers: run each version on ONNX Runtime (onnx, or onnx-int8 with int8
    weights; a CPU only), or with its weights in bfloat16 as a TorchScript trace (bf16;
    a CPU with AVX512-BF16 or AMX-BF16, or a GPU that computes bfloat16 natively), made
    when it loads and checked against the float32 model on sample texts (same labels,
    class probabilities within a tolerance); where it cannot run or differs, the version
    serves as without it (trace). auto: bf16 where the device computes bfloat16
    natively, else none. None: TorchScript or eager."""
    models: Optional[list[str]] = None
    """Model names to serve; default: every model in the registry."""
    pinned_versions: dict[str, str] = field(default_factory=dict)
    """model name -> version pinned through Serve's user_config (declarative: a
    RayService or `serve deploy` change reconfigures replicas without restarting them)."""
    model_tasks: dict[str, str] = field(default_factory=dict)
    """model name -> task (classification, generation) of models served before they have
    a version: the app deploys on an empty registry, health answers NOT_SERVING for them
    until a version is promoted, which the replicas load without a redeploy. A model
    named here that has versions must hold this task."""
    api_token_file: Optional[str] = None
    """File holding the Inference API token (e.g. a mounted Secret); default: env
    TUNESERVE_API_TOKEN. Clients send `authorization: Bearer <token>`."""
    admin_token_file: Optional[str] = None
    """File holding the Admin API token; default: env TUNESERVE_ADMIN_TOKEN."""
    tls_cert_file: Optional[str] = None
    """PEM certificate chain the gRPC port presents (with tls_key_file): TLS, terminated
    by the ingress replicas' own servers, so it needs replica_grpc (Serve's gRPC proxy
    cannot terminate TLS: ray-project/ray#34103). Re-read when the file changes (a
    renewed Secret): new connections get the new certificate, no restart."""
    tls_key_file: Optional[str] = None
    """PEM private key (unencrypted) of tls_cert_file."""
    tls_client_ca_file: Optional[str] = None
    """PEM CA certificates: with it, mutual TLS: a client must present a certificate
    signed by one of them."""
    admin_port: Optional[int] = None
    """Port of the Admin service (Promote, Rollback, Pin, Unpin), answered by each
    ingress replica's own gRPC server on `host`, apart from inference; None: no Admin
    service at all. The inference port answers Admin methods UNIMPLEMENTED. Callers
    need an admin token (admin_token_file); an API token is PERMISSION_DENIED there.
    With TLS files, the admin port is TLS too."""
    health_port: Optional[int] = None
    """Port of a plaintext server in each ingress replica answering grpc.health.v1
    alone (Check and Watch, no token, nothing else), on `host`; None: none. For
    Kubernetes' gRPC probes, which cannot speak TLS: a probe of it asks the pod's own
    ingress replica, not one elsewhere. The replicas of a node share it."""
    max_connections: int = 5000
    """Connections each of tuneserve's own gRPC servers (replica_grpc, admin_port,
    health_port) accepts at once; more are closed at once. Each server raises its
    process's soft open-files limit to fit (up to the hard limit). An idle connection
    costs a few kB; the bound is high enough that 2,000 idle connections held by
    one client leave room for the others (bench/abuse.py)."""
    max_concurrent_rpcs: int = 1000
    """Calls each of tuneserve's own gRPC servers runs at once; more answer
    RESOURCE_EXHAUSTED."""
    max_streams_per_connection: int = 100
    """HTTP/2 streams (calls) one connection may have open at once on those servers."""
    connection_idle_s: float = 300.0
    """Those servers close a connection that has had no call for this long."""
    connection_max_age_s: float = 3600.0
    """Those servers ask a client to reconnect after this long (GOAWAY: calls in flight
    get request_timeout_s more), which ends even a connection kept busy forever."""
    limits: ServeLimits = field(default_factory=ServeLimits)

    def validate(self) -> "ServeConfig":
        """Checks every setting, naming the first bad one (ConfigError); returns this
        config, unchanged."""
        for check in SERVE_CHECKS:
            check(self)
        return self
    def ongoing_for(self, task: str) -> int:
        """max_ongoing_requests of a model deployment of this task."""
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return 8 if task == GENERATION else 2 * self.max_batch_size

    def coalescing(self, task: str) -> Optional[dict[str, int]]:
        """The ingress's Coalescer limits for a model of this task (None: not coalesced;
        a colocated model is called in-process, where its own batcher does the work).
        With autoscaling they allow for max_replicas, so that a saturated deployment
        shows the autoscaler more than its target in flight per replica."""
        if not self.coalesce or self.colocate or task != CLASSIFICATION:
            return None
        replicas = self.max_replicas if self.max_replicas is not None else self.num_replicas
        ongoing = self.ongoing_for(task)
        return {"max_calls": 2 * replicas, "max_items": ongoing * replicas,
                "max_call_items": max(1, min(self.max_batch_size, ongoing)),
                "max_pending": self.max_queued_requests}

    def replica_grpc_server(self) -> Optional[dict[str, Any]]:
        """The ingress's `grpc_server` argument (None: Serve alone answers gRPC). Calls
        up to twice the request limit reach the size check (RESOURCE_EXHAUSTED naming
        the limit); grpc refuses larger ones before reading them."""
        if not self.replica_grpc:
            return None
        server = {"host": self.host, "port": self.grpc_port,
                  "max_receive_bytes": self.max_message_bytes(), "bounds": self.bounds()}
        if self.tls_cert_file:
            server["tls"] = self._tls_files()
        return server

    def admin_grpc_server(self) -> Optional[dict[str, Any]]:
        """The ingress's `admin_server` argument: where its Admin service listens (None:
        no Admin service). TLS as on the inference port."""
        if self.admin_port is None:
            return None
        server = {"host": self.host, "port": self.admin_port,
                  "max_receive_bytes": self.max_message_bytes(), "bounds": self.bounds()}
        if self.tls_cert_file:
            server["tls"] = self._tls_files()
        return server

    def health_grpc_server(self) -> Optional[dict[str, Any]]:
        """The ingress's `health_server` argument: where its plaintext health server
        listens (None: none). Health requests are tiny: a small receive limit."""
        if self.health_port is None:
            return None
        return {"host": self.host, "port": self.health_port, "max_receive_bytes": 4096,
                "bounds": self.bounds()}

    def max_message_bytes(self) -> int:
        """The largest message any gRPC server reads (its length prefix says; larger
        ones are refused unread, RESOURCE_EXHAUSTED): twice the request limit, so that
        requests up to that reach the ingress's size check and its message."""
        return 2 * self.limits.max_request_bytes

    def bounds(self) -> dict[str, Any]:
        """The limits of tuneserve's own gRPC servers (ReplicaGrpcServer's `bounds`)."""
        return {"max_connections": self.max_connections,
                "max_concurrent_rpcs": self.max_concurrent_rpcs,
                "max_streams_per_connection": self.max_streams_per_connection,
                "connection_idle_s": self.connection_idle_s,
                "connection_max_age_s": self.connection_max_age_s,
                "grace_s": float(self.limits.request_timeout_s)}

    def _tls_files(self) -> dict[str, Optional[str]]:
        """The TLS files as absolute paths: a replica's working folder is not ours."""
        return {name: os.path.abspath(path) if path else None
                for name, path in (("cert_file", self.tls_cert_file),
                                   ("key_file", self.tls_key_file),
                                   ("client_ca_file", self.tls_client_ca_file))}

    def deployment_logging(self) -> dict[str, Any]:
        """Extra Serve deployment options for logging (none unless the access log is off)."""
        return {} if self.access_log else {"logging_config": {"enable_access_log": False}}

    def autoscaling_config(self) -> Optional[dict]:
        """Serve's autoscaling_config, shared by `tuneserve serve` and the RayService."""
        if self.max_replicas is None:
            return None
        return {"min_replicas": 1 if self.min_replicas is None else self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
                **self.autoscaling_overrides}


def _bad_serve(name: str, why: str) -> ConfigError:
    return ConfigError(f"invalid serve setting '{name}': {why}")


def _check_serve_names(cfg: ServeConfig) -> None:
    """Ports, the channel and the served models' names."""
    check_port("grpc_port", cfg.grpc_port)
    if cfg.metrics_port is not None:
        check_port("metrics_port", cfg.metrics_port)
    taken = {cfg.grpc_port: "grpc", cfg.metrics_port: "metrics"}
    for name, what in (("admin_port", "the Admin service"), ("health_port", "health")):
        port = getattr(cfg, name)
        if port is None:
            continue
        check_port(name, port)
        if port in taken:
            raise _bad_serve(name, f"port {port} is already the {taken[port]} port; "
                             f"{what} needs a port of its own")
        taken[port] = name.split("_")[0]
    try:
        validate_name(cfg.channel, "channel")
    except TuneserveError as exc:
        raise _bad_serve("channel", str(exc)) from None


def _check_serve_counts(cfg: ServeConfig) -> None:
    """Integers: (field, smallest value); None is "unset" where the field allows it."""
    for name, low in (("num_replicas", 1), ("max_ongoing_requests", 1),
                      ("max_batch_size", 1), ("min_replicas", 0), ("max_replicas", 1),
                      ("ingress_replicas", 1), ("max_connections", 1),
                      ("max_concurrent_rpcs", 1), ("max_streams_per_connection", 1)):
        value = getattr(cfg, name)
        if value is None and name in ("max_ongoing_requests", "min_replicas",
                                      "max_replicas"):
            continue
        if not _is_int(value) or value < low:
            raise _bad_serve(name, f"must be an integer >= {low}, got {value!r}")
    if not _is_int(cfg.max_queued_requests) or \
            (cfg.max_queued_requests < 1 and cfg.max_queued_requests != -1):
        raise _bad_serve("max_queued_requests", "must be -1 (no limit) or a positive "
                         f"integer, got {cfg.max_queued_requests!r}")


def _check_serve_numbers(cfg: ServeConfig) -> None:
    """nan passes no comparison and inf is no setting, so both are refused first; then
    (field, smallest value, whether the smallest is allowed)."""
    for name, low, inclusive in (("poll_interval_s", 0.0, False),
                                 ("replica_cpus", 0.0, False),
                                 ("replica_gpus", 0.0, True),
                                 ("ingress_cpus", 0.0, True),
                                 ("target_ongoing_requests", 0.0, False),
                                 ("upscale_delay_s", 0.0, True),
                                 ("downscale_delay_s", 0.0, True),
                                 ("batch_wait_timeout_s", 0.0, True),
                                 ("generation_batch_wait_timeout_s", 0.0, True),
                                 ("connection_idle_s", 0.0, False),
                                 ("connection_max_age_s", 0.0, False)):
        value = getattr(cfg, name)
        if not _is_number(value) or not math.isfinite(value):
            raise _bad_serve(name, f"must be a finite number, got {value!r}")
        if value < low or (value == low and not inclusive):
            raise _bad_serve(name, f"must be {'>=' if inclusive else '>'} {low:g}, "
                             f"got {value!r}")
    for name in ("replica_cpus", "replica_gpus", "ingress_cpus"):
        value = getattr(cfg, name)
        if 0 < value < 0.0001:  # Ray's resource precision
            raise _bad_serve(name, f"must be 0 or at least 0.0001, got {value!r}")


def _check_serve_scaling(cfg: ServeConfig) -> None:
    """A fixed number of replicas or autoscaling bounds, not both."""
    if cfg.max_replicas is not None:
        low = 1 if cfg.min_replicas is None else cfg.min_replicas
        if cfg.max_replicas < max(1, low):
            raise _bad_serve("max_replicas", f"must be >= min_replicas ({low}) and >= 1")
        if cfg.num_replicas != 1:  # it would be dropped without a word
            raise _bad_serve("num_replicas", "is for a fixed number of replicas; with "
                             "max_replicas (autoscaling) set min_replicas instead")
    elif cfg.min_replicas is not None:
        raise _bad_serve("min_replicas", "needs max_replicas (autoscaling) as well")


def _check_serve_models(cfg: ServeConfig) -> None:
    if cfg.models is None:
        return
    if not isinstance(cfg.models, list) or not cfg.models:
        raise _bad_serve("models", f"must be a list of model names, got {cfg.models!r}")
    for model in cfg.models:
        try:
            validate_name(model, "model")
        except TuneserveError as exc:
            raise _bad_serve("models", str(exc)) from None


def _check_serve_model_tasks(cfg: ServeConfig) -> None:
    """model_tasks: valid names of models served here, each with a known task."""
    if not isinstance(cfg.model_tasks, dict):
        raise _bad_serve("model_tasks", "must map model names to tasks, e.g. "
                         f"{{sentiment: {CLASSIFICATION}}}, got {cfg.model_tasks!r}")
    for model, task in cfg.model_tasks.items():
        try:
            validate_name(model, "model")
        except TuneserveError as exc:
            raise _bad_serve("model_tasks", str(exc)) from None
        if task not in TASKS:
            raise _bad_serve("model_tasks", f"model {model!r}: task {task!r} is not one of "
                             f"{', '.join(TASKS)}")
        if cfg.models is not None and model not in cfg.models:
            raise _bad_serve("model_tasks", f"model {model!r} is not in models "
                             f"({', '.join(cfg.models)}): name it there too")


def _check_serve_runtime(cfg: ServeConfig) -> None:
    """The weights' dtype and how generators batch."""
    if cfg.dtype not in SERVING_DTYPES:
        raise _bad_serve("dtype", f"{cfg.dtype!r} is not one of {', '.join(SERVING_DTYPES)}")
    if cfg.generation_batching not in GENERATION_BATCHING:
        raise _bad_serve("generation_batching", f"{cfg.generation_batching!r} is not one "
                         f"of {', '.join(GENERATION_BATCHING)}")
    if cfg.dtype == "float16" and not cfg.replica_gpus:
        raise _bad_serve("dtype", "float16 needs a GPU (replica_gpus > 0); on a CPU use "
                         "bfloat16")
    if cfg.max_input_tokens is not None and \
            (not _is_int(cfg.max_input_tokens) or cfg.max_input_tokens < 8):
        raise _bad_serve("max_input_tokens", f"must be an integer >= 8, got "
                         f"{cfg.max_input_tokens!r}")
    if cfg.optimize is not None and cfg.optimize not in CLASSIFIER_OPTIMIZERS:
        raise _bad_serve("optimize", f"{cfg.optimize!r} is not one of "
                         f"{', '.join(CLASSIFIER_OPTIMIZERS)}")
    if cfg.optimize in BF16_OPTIMIZERS and cfg.dtype not in ("auto", "float32"):
        raise _bad_serve("optimize", f"{cfg.optimize} checks bfloat16 weights against the "
                         f"float32 model, so it loads float32: leave dtype auto or float32 "
                         f"(not {cfg.dtype})")
    if cfg.truncation not in ("truncate", "refuse"):
        raise _bad_serve("truncation", f"{cfg.truncation!r} is not one of truncate, refuse")


def _check_serve_ingress(cfg: ServeConfig) -> None:
    """colocate, direct_ingress and replica_grpc: the combinations that work."""
    if cfg.colocate and cfg.direct_ingress and \
            (cfg.max_replicas is not None or cfg.num_replicas != 1):
        raise _bad_serve("colocate", "with direct_ingress the ingress replica listens on "
                         "grpc_port itself, so it runs one replica: set num_replicas 1 and "
                         "no max_replicas, or drop direct_ingress")
    if cfg.ingress_replicas != 1 and (cfg.colocate or cfg.direct_ingress):
        raise _bad_serve("ingress_replicas", "with colocate the ingress replicas are the "
                         "model replicas (set num_replicas), and direct_ingress runs one "
                         "ingress replica: leave ingress_replicas at 1"
                         if cfg.colocate else "direct_ingress runs one ingress replica "
                         "per node: leave ingress_replicas at 1")
    if cfg.replica_grpc and cfg.direct_ingress:
        raise _bad_serve("replica_grpc", "both replica_grpc and direct_ingress put a gRPC "
                         "server in the ingress replica on grpc_port: choose one")


def _check_serve_limits(cfg: ServeConfig) -> None:
    for f in fields(cfg.limits):
        value = getattr(cfg.limits, f.name)
        low = 0 if f.name == "max_stop_sequences" else 1
        if not _is_int(value) or value < low:
            raise _bad_serve(f"limits.{f.name}", f"must be an integer >= {low}, got {value!r}")
    if cfg.limits.max_request_bytes < 1024:
        raise _bad_serve("limits.max_request_bytes", "must be at least 1024")
    if cfg.max_message_bytes() >= 2 ** 31:
        raise _bad_serve("limits.max_request_bytes", "must be under 1 GiB (gRPC reads "
                         "messages up to twice it, and no message over 2 GiB)")


TLS_FLAGS = {"tls_cert_file": "--tls-cert", "tls_key_file": "--tls-key",
             "tls_client_ca_file": "--tls-client-ca"}
"""The `tuneserve serve` flag of each TLS setting, named in its errors."""

TLS_LAYOUT = ("TLS is terminated by each ingress replica's own gRPC server (replica_grpc: "
              "tuneserve serve --layout colocated, the default, or models); Serve's gRPC "
              "proxy cannot terminate TLS (ray-project/ray#34103)")


def _bad_tls(name: str, why: str) -> ConfigError:
    return _bad_serve(name, f"{TLS_FLAGS[name]} {why}")


def _check_serve_tls(cfg: ServeConfig) -> None:
    """The TLS files, and a layout that can terminate TLS."""
    given = [n for n in TLS_FLAGS if getattr(cfg, n) is not None]
    if not given:
        return
    for name in ("tls_cert_file", "tls_key_file"):
        if getattr(cfg, name) is None:
            raise _bad_tls(name, f"is needed with {TLS_FLAGS[given[0]]}: --tls-cert "
                           "and --tls-key go together")
    if cfg.direct_ingress:
        raise _bad_serve("direct_ingress", f"Ray's direct ingress has no TLS; {TLS_LAYOUT}: "
                         "drop direct_ingress")
    if not cfg.replica_grpc:
        raise _bad_serve("replica_grpc", f"{TLS_LAYOUT}: set replica_grpc")
    check_tls_files(cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_client_ca_file)


def check_tls_files(cert_file: str, key_file: str, client_ca_file: Optional[str]) -> None:
    """The files exist and hold PEM certificates / an unencrypted key that matches the
    certificate; ConfigError naming the flag otherwise. Also used when they are re-read."""
    for name, path, marker in (("tls_cert_file", cert_file, "CERTIFICATE"),
                               ("tls_key_file", key_file, "PRIVATE KEY"),
                               ("tls_client_ca_file", client_ca_file, "CERTIFICATE")):
        if path is None:
            continue
        try:
            text = Path(path).read_bytes()
        except OSError as exc:
            raise _bad_tls(name, f"{path}: cannot read it ({exc.strerror or exc})") from None
        if f"-----BEGIN {marker}-----".encode() not in text and \
                not (marker == "PRIVATE KEY" and b"PRIVATE KEY-----" in text):
            raise _bad_tls(name, f"{path}: no PEM {marker.lower()} in it")
        if b"ENCRYPTED" in text and marker == "PRIVATE KEY":
            raise _bad_tls(name, f"{path}: the key is encrypted; gRPC needs it unencrypted")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert_file, key_file, password=b"")
    except ssl.SSLError as exc:
        why = "the key does not match the certificate" if "KEY_VALUES_MISMATCH" in str(exc) \
            else f"cannot load the certificate and key ({exc.reason or exc})"
        raise _bad_tls("tls_key_file", f"{key_file}: {why} ({cert_file})") from None
    if client_ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=client_ca_file)
        except ssl.SSLError as exc:
            raise _bad_tls("tls_client_ca_file", f"{client_ca_file}: not PEM CA "
                           f"certificates ({exc.reason or exc})") from None


SERVE_CHECKS: tuple[Callable[[ServeConfig], None], ...] = (
    _check_serve_names, _check_serve_counts, _check_serve_numbers, _check_serve_scaling,
    _check_serve_models, _check_serve_model_tasks, _check_serve_runtime, _check_serve_tls, _check_serve_ingress,
    _check_serve_limits)
"""ServeConfig.validate's checks, in the order settings are reported."""
