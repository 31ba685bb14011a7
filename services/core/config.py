"""Typed configuration for training runs and for serving.

One YAML file per run (`tuneserve train --config run.yaml`); command-line flags
override it; the resolved config is validated in `__post_init__`-style `validate()`
and saved inside every published checkpoint's manifest, so a version always says how
it was trained. Units are in the names (`_s`, `_chars`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import string
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from services.core.errors import ConfigError, TuneserveError

DEFAULT_HOME = Path(os.environ.get("TUNESERVE_HOME", ".tuneserve"))
DEFAULT_REGISTRY = str(DEFAULT_HOME / "registry")
DEFAULT_RUNS_DIR = str(DEFAULT_HOME / "runs")
CLASSIFICATION = "classification"
GENERATION = "generation"
TASKS = (CLASSIFICATION, GENERATION)
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
    import ast
    import inspect
    import textwrap

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


GATE_METRICS = {
    "classification": ("accuracy", "macro_f1", "macro_precision", "macro_recall", "loss"),
    "generation": ("loss", "perplexity"),
}
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
    task: str = "classification"
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
    """Where Ray Train keeps run state and checkpoints."""
    workers: int = 1
    """Number of Ray Train workers (data parallel)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker; also the worker's torch thread count."""
    use_gpu: bool = False
    """One GPU per worker, bf16 autocast where supported."""
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
    early_stopping_patience: int = 0
    """Stop after this many evaluations in a row without the eval metric improving by
    more than early_stopping_min_delta; the best checkpoint is published. 0: off."""
    early_stopping_min_delta: float = 0.0
    """Smallest change of the eval metric that counts as an improvement."""
    class_weights: Optional[str] = None
    """Classification: loss weights per class, 'balanced' (n / (classes x count), for
    imbalanced labels) or label=weight pairs, e.g. 'spam=3,ham=1'. Default: none."""
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
    production's (accuracy as high for classification, eval loss as low for generation)."""
    min_metric: Optional[str] = None
    """With --promote: also require e.g. accuracy=0.85."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes kept in the manifest."""

    def validate(self) -> "TrainConfig":
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"invalid config field '{name}': {why}")

        if not self.model:
            raise bad("model", "required (a Hugging Face model id or a local folder)")
        if not self.train:
            raise bad("train", "required (path of the training data file)")
        if self.task not in TASKS:
            raise bad("task", f"must be one of {', '.join(TASKS)}, got {self.task!r}")
        if not (0.0 < self.eval_fraction < 1.0):
            raise bad("eval_fraction", f"must be between 0 and 1, got {self.eval_fraction}")
        self._apply_task_defaults()
        for f in fields(self):  # nan passes every comparison below; inf is no setting
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(f.name, f"must be a finite number, got {value}")
        for name in ("workers", "epochs", "batch_size", "grad_accum_steps", "max_length",
                     "log_every_steps", "eval_steps"):
            value = getattr(self, name)
            if name in ("max_length", "eval_steps") and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, f"must be a positive integer, got {value!r}")
        if self.max_length is not None and self.max_length < 8:
            raise bad("max_length", f"must be at least 8, got {self.max_length}")
        for name in ("early_stopping_patience", "max_failures", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(name, f"must be an integer >= 0, got {value!r}")
        if self.seed > SEED_MAX:  # torch.manual_seed would fail in every worker
            raise bad("seed", f"must be at most {SEED_MAX} (2**64 - 1), got {self.seed}")
        if self.early_stopping_min_delta < 0:
            raise bad("early_stopping_min_delta",
                      f"must be >= 0, got {self.early_stopping_min_delta}")
        if self.class_weights is not None:
            if self.task != "classification":
                raise bad("class_weights", "applies to --task classification only")
            parse_class_weights(self.class_weights)
        if self.cpus_per_worker <= 0:
            raise bad("cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        if not (0.0 < self.learning_rate < 1.0):
            raise bad("learning_rate", f"must be in (0, 1), got {self.learning_rate}")
        if not (0.0 <= self.weight_decay < 1.0):
            raise bad("weight_decay", f"must be in [0, 1), got {self.weight_decay}")
        if not (0.0 <= self.warmup_ratio < 1.0):
            raise bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm <= 0:
            raise bad("max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        per_step = self.workers * self.grad_accum_steps
        if self.batch_size % per_step:
            raise bad(
                "batch_size",
                f"{self.batch_size} is not divisible by workers x grad_accum_steps "
                f"({self.workers} x {self.grad_accum_steps} = {per_step})",
            )
        self._validate_generation(bad)
        if self.columns is not None:
            if isinstance(self.columns, str):
                self.columns = [c.strip() for c in self.columns.split(",")]
            _check_names(bad, "columns", self.columns)
            if not self.columns or any(not c for c in self.columns):
                raise bad("columns", "must be a comma-separated list of column names")
            twice = sorted({c for c in self.columns if self.columns.count(c) > 1})
            if twice:
                raise bad("columns", f"names a column twice: {', '.join(twice)}")
        for a, b in (("text_column", "label_column"), ("prompt_column", "response_column")):
            if getattr(self, a) and getattr(self, a) == getattr(self, b):
                raise bad(b, f"is the same column as {a} ({getattr(self, a)!r})")
        if self.name is None:
            self.name = Path(self.train).stem
        from services.core.registry import validate_name

        try:
            validate_name(self.name, "model")
        except Exception as exc:
            raise bad("name", str(exc)) from None
        if self.min_metric:
            check_min_metric(self.min_metric, self.task)
            if not self.promote:
                raise bad("min_metric", "is the threshold of --promote: pass --promote too "
                          "(or drop min_metric)")
        if self.extra:
            try:
                json.dumps(self.extra, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise bad("extra", f"must hold plain values (text, numbers, lists, "
                          f"mappings) as the manifest is JSON: {exc}") from None
        return self

    def _apply_task_defaults(self) -> None:
        """Fill the fields left unset with the defaults of the task (docs/quality.md)."""
        generation = self.task == "generation"
        if self.group_by_length is None:
            self.group_by_length = not generation
        if self.epochs is None:
            self.epochs = 2 if generation else 3
        if self.learning_rate is None:
            self.learning_rate = (2e-4 if self.lora_r else 2e-5) if generation else 5e-5
        if self.warmup_ratio is None:
            self.warmup_ratio = 0.03 if generation else 0.06

    def _validate_generation(self, bad) -> None:
        generation = self.task == "generation"
        if self.prompt_template is not None:
            if not generation:
                raise bad("prompt_template", "applies to --task generation only")
            try:
                rendered = render_prompt(self.prompt_template, "\x00")
            except (KeyError, IndexError, ValueError) as exc:
                raise bad("prompt_template", f"must contain {{prompt}} and no other "
                          f"{{...}} field (write {{{{ and }}}} for literal braces): {exc!r}")
            for _, field, spec, conversion in string.Formatter().parse(self.prompt_template):
                if field is not None and (field != "prompt" or spec or conversion):
                    raise bad("prompt_template", f"write {{prompt}} as it is, without an "
                              f"index, attribute, format or conversion (got "
                              f"{{{field}{'!' + conversion if conversion else ''}"
                              f"{':' + spec if spec else ''}}})")
            if rendered.count("\x00") != 1:
                raise bad("prompt_template", "must contain {prompt} exactly once")
        if self.packing and not generation:
            raise bad("packing", "applies to --task generation only")
        if not isinstance(self.lora_r, int) or isinstance(self.lora_r, bool) or self.lora_r < 0:
            raise bad("lora_r", f"must be an integer >= 0, got {self.lora_r!r}")
        if self.lora_r:
            if not generation:
                raise bad("lora_r", "LoRA applies to --task generation only")
            if self.lora_alpha <= 0:
                raise bad("lora_alpha", f"must be > 0, got {self.lora_alpha}")
            if not (0.0 <= self.lora_dropout < 1.0):
                raise bad("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
            if isinstance(self.lora_target_modules, str):
                self.lora_target_modules = [m.strip() for m in
                                            self.lora_target_modules.split(",")]
            if self.lora_target_modules is not None:
                _check_names(bad, "lora_target_modules", self.lora_target_modules)
            if self.lora_target_modules is not None and (
                    not self.lora_target_modules or any(not m for m in self.lora_target_modules)):
                raise bad("lora_target_modules", "must be a comma-separated list of names")

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
        cfg = cls()
        for key, value in data.items():
            key = key.replace("-", "_")
            setattr(cfg, key, _coerce(cls, key, value, source))
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(load_yaml_mapping(path), source=str(path))

    def merged(self, overrides: dict[str, Any]) -> "TrainConfig":
        """A copy with every non-None override applied."""
        data = self.to_dict()
        data.update({k: v for k, v in overrides.items() if v is not None})
        return TrainConfig.from_dict(data, source="command line")


def _check_names(bad, name: str, value: Any) -> None:
    """A list-of-text field holds text only (YAML reads `[1, 2]` as numbers)."""
    if not isinstance(value, list):
        raise bad(name, f"must be a list of names, got {type(value).__name__} {value!r}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise bad(name, f"must be a list of names (text); item {i + 1} is "
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
    characters, about 10 MiB)."""


SERVING_DTYPES = ("auto", "float32", "bfloat16", "float16")
GENERATION_BATCHING = ("continuous", "static")
"""What `ServeConfig.dtype` may name (services.core.modeling.serving_dtype)."""


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
    bound."""
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
    """Ray Serve's direct ingress (experimental in Ray 2.60): the ingress replica itself
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
    num_replicas > 1 several model processes serve one port (docs/benchmarks.md: 1.7-1.9x
    one process's throughput on two cores). Clients need several connections to reach
    several replicas. Serve's proxy answers the same methods on another port
    (`tuneserve serve` picks a free one; in a Serve config or RayService, give
    grpc_options a port other than grpc_port). Works on any cluster, nothing to set
    when it starts. Serve's autoscaler does not see these calls: not with max_replicas,
    nor with direct_ingress."""
    access_log: bool = True
    """Serve's access log: a line per request in each replica's log. It costs about 2 ms
    of CPU per request on a small CPU (docs/benchmarks.md); tuneserve's own request
    metrics count every call either way."""
    generation_batching: str = "continuous"
    """How a generator replica batches requests. continuous: a request joins the running
    batch at its next decoding step and leaves it as soon as it ends, so nobody waits
    for a batch to finish (services/runtime/continuous.py); a version whose model cannot be
    batched so (a sliding-window cache, or tokens that differ from a static batch's
    in a check at load) gets static batches, with a warning. static: one Hugging Face
    `generate` call per batch, which runs until its longest request ends."""
    generation_batch_wait_timeout_s: float = 0.02
    """Continuous batching: only a request that finds the replica idle waits, a quarter
    of this for a second request and, once one came, all of it for the rest of the
    burst, so that a burst's prompts go through the model in one pass; requests that
    come while others decode join at the next token without waiting.
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
    models: Optional[list[str]] = None
    """Model names to serve; default: every model in the registry."""
    pinned_versions: dict[str, str] = field(default_factory=dict)
    """model name -> version pinned through Serve's user_config (declarative: a
    RayService or `serve deploy` change reconfigures replicas without restarting them)."""
    api_token_file: Optional[str] = None
    """File holding the Inference API token (e.g. a mounted Secret); default: env
    TUNESERVE_API_TOKEN. Clients send `authorization: Bearer <token>`."""
    admin_token_file: Optional[str] = None
    """File holding the Admin API token; default: env TUNESERVE_ADMIN_TOKEN."""
    limits: ServeLimits = field(default_factory=ServeLimits)

    def validate(self) -> "ServeConfig":
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"invalid serve setting '{name}': {why}")

        check_port("grpc_port", self.grpc_port)
        if self.metrics_port is not None:
            check_port("metrics_port", self.metrics_port)
        from services.core.registry.store import validate_name  # (it imports this module)

        try:
            validate_name(self.channel, "channel")
        except TuneserveError as exc:
            raise bad("channel", str(exc)) from None
        # Integers: (field, smallest value); None is "unset" where the field allows it.
        for name, low in (("num_replicas", 1), ("max_ongoing_requests", 1),
                          ("max_batch_size", 1), ("min_replicas", 0), ("max_replicas", 1)):
            value = getattr(self, name)
            if value is None and name in ("max_ongoing_requests", "min_replicas",
                                          "max_replicas"):
                continue
            if not _is_int(value) or value < low:
                raise bad(name, f"must be an integer >= {low}, got {value!r}")
        if not _is_int(self.max_queued_requests) or \
                (self.max_queued_requests < 1 and self.max_queued_requests != -1):
            raise bad("max_queued_requests", "must be -1 (no limit) or a positive integer, "
                      f"got {self.max_queued_requests!r}")
        # Numbers: nan passes no comparison and inf is no setting, so both are refused
        # first; then (field, smallest value, whether the smallest is allowed).
        for name, low, inclusive in (("poll_interval_s", 0.0, False),
                                     ("replica_cpus", 0.0, False),
                                     ("replica_gpus", 0.0, True),
                                     ("ingress_cpus", 0.0, True),
                                     ("target_ongoing_requests", 0.0, False),
                                     ("upscale_delay_s", 0.0, True),
                                     ("downscale_delay_s", 0.0, True),
                                     ("batch_wait_timeout_s", 0.0, True),
                                     ("generation_batch_wait_timeout_s", 0.0, True)):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise bad(name, f"must be a finite number, got {value!r}")
            if value < low or (value == low and not inclusive):
                raise bad(name, f"must be {'>=' if inclusive else '>'} {low:g}, got {value!r}")
        for name in ("replica_cpus", "replica_gpus", "ingress_cpus"):
            value = getattr(self, name)
            if 0 < value < 0.0001:  # Ray's resource precision
                raise bad(name, f"must be 0 or at least 0.0001, got {value!r}")
        if self.max_replicas is not None:
            low = 1 if self.min_replicas is None else self.min_replicas
            if self.max_replicas < max(1, low):
                raise bad("max_replicas", f"must be >= min_replicas ({low}) and >= 1")
            if self.num_replicas != 1:  # it would be dropped without a word
                raise bad("num_replicas", "is for a fixed number of replicas; with "
                          "max_replicas (autoscaling) set min_replicas instead")
        elif self.min_replicas is not None:
            raise bad("min_replicas", "needs max_replicas (autoscaling) as well")
        if self.models is not None:
            if not isinstance(self.models, list) or not self.models:
                raise bad("models", f"must be a list of model names, got {self.models!r}")
            for model in self.models:
                try:
                    validate_name(model, "model")
                except TuneserveError as exc:
                    raise bad("models", str(exc)) from None
        if self.dtype not in SERVING_DTYPES:
            raise bad("dtype", f"{self.dtype!r} is not one of {', '.join(SERVING_DTYPES)}")
        if self.generation_batching not in GENERATION_BATCHING:
            raise bad("generation_batching", f"{self.generation_batching!r} is not one of "
                      f"{', '.join(GENERATION_BATCHING)}")
        if self.dtype == "float16" and not self.replica_gpus:
            raise bad("dtype", "float16 needs a GPU (replica_gpus > 0); on a CPU use "
                      "bfloat16")
        if self.colocate and self.direct_ingress and \
                (self.max_replicas is not None or self.num_replicas != 1):
            raise bad("colocate", "with direct_ingress the ingress replica listens on "
                      "grpc_port itself, so it runs one replica: set num_replicas 1 and no "
                      "max_replicas, or drop direct_ingress")
        if self.replica_grpc and self.direct_ingress:
            raise bad("replica_grpc", "both replica_grpc and direct_ingress put a gRPC "
                      "server in the ingress replica on grpc_port: choose one")
        if self.replica_grpc and self.max_replicas is not None:
            raise bad("replica_grpc", "Serve's autoscaler does not see the calls the "
                      "ingress replicas' own gRPC servers answer: set num_replicas "
                      "instead of max_replicas, or drop replica_grpc")
        for f in fields(self.limits):
            value = getattr(self.limits, f.name)
            low = 0 if f.name == "max_stop_sequences" else 1
            if not _is_int(value) or value < low:
                raise bad(f"limits.{f.name}", f"must be an integer >= {low}, got {value!r}")
        if self.limits.max_request_bytes < 1024:
            raise bad("limits.max_request_bytes", "must be at least 1024")
        return self

    def ongoing_for(self, task: str) -> int:
        """max_ongoing_requests of a model deployment of this task."""
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return 8 if task == "generation" else 2 * self.max_batch_size

    def coalescing(self, task: str) -> Optional[dict[str, int]]:
        """The ingress's Coalescer limits for a model of this task (None: not coalesced;
        a colocated model is called in-process, where its own batcher does the work).
        With autoscaling they allow for max_replicas, so that a saturated deployment
        shows the autoscaler more than its target in flight per replica."""
        if not self.coalesce or self.colocate or task != "classification":
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
        return {"host": self.host, "port": self.grpc_port,
                "max_receive_bytes": 2 * self.limits.max_request_bytes}

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
