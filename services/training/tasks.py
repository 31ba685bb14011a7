"""What differs between training a classifier and fine-tuning a causal LM.

A Task (made from a ResolvedTrainConfig by `make_task`) travels to the workers in the
LoopConfig. Driver side: prepare_data, describe_*, summary, manifest_fields. Worker
side: build_model, dataset/collate, loss_sum/loss_denominator, evaluate (exact over
all ranks), save/load_weights. A new task is one subclass here, its TASK_CLASSES
entry and its row in services.core.config.TASK_DEFAULTS (core fills defaults in when
resolving a config; it cannot import training).
"""

from __future__ import annotations

import copy
import glob
import json
import math
import os
from typing import Any, Optional, Sequence

import numpy as np

from services.core.config import (CLASSIFICATION, GENERATION, TASK_DEFAULTS,
                                  ResolvedTrainConfig, TaskDefaults, parse_class_weights,
                                  render_prompt)
from services.core.data import (LABEL_COLUMN_CANDIDATES, PROMPT_COLUMN_CANDIDATES,
                                RESPONSE_COLUMN_CANDIDATES, TEXT_COLUMN_CANDIDATES, LabelSet,
                                alpaca_input, load_labelled, load_pairs, pick_columns,
                                split_indices, stratified_split_indices)
from services.core.evaluation import metrics_from_confusion
from services.core.evaluation import summary as evaluation_summary
from services.core.errors import ConfigError, DataError
from services.core.modeling import (GENERATION_FILE, check_causal_lm, eos_token_ids,
                                    load_causal_lm_for_training,
                                    load_classifier_for_training)
from services.core.pooling import is_head_parameter, resolve_pooling, unwrap
from services.core.sources import DataSource, identity
from services.training import streamed
from services.training.encoded import (EncodedSplit, choose_max_length, encode_pairs,
                                       encode_texts, model_limit, pad_batch)
from services.training.parallel import SHARDED_DIR
from services.training.promotion import last_within_noise

IGNORE_INDEX = -100


class Task:
    name = ""
    defaults: TaskDefaults
    """The values resolving a config of this task gives the fields left unset."""
    metric = "eval_loss"
    """The metric that picks the best epoch (checkpoint score attribute)."""
    metric_mode = "min"
    label_names: list[str] = []
    eval_rows: Optional[tuple[list[str], list[str]]] = None
    """After prepare_data, a classifier's eval texts and labels as read (the driver
    takes them off the task before it goes to the workers)."""

    def __init__(self, cfg: ResolvedTrainConfig, model_ref: Optional[str] = None):
        """`model_ref`: what the workers load (prepare_model_ref's local folder made
        absolute); default: the config's model."""
        self.model_ref: str = model_ref or cfg.modeling.model
        self.max_length: Optional[int] = cfg.data.max_length
        self.pad_id: Optional[int] = None

    # ---- driver side -----------------------------------------------------------
    def prepare_data(self, cfg, tokenizer) -> tuple[dict[str, EncodedSplit], dict]:
        raise NotImplementedError

    def prepare_stream(self, cfg, tokenizer, train: DataSource, evald: Optional[DataSource],
                       cpus: Optional[float]) -> tuple[dict[str, Any], tuple[int, int], dict]:
        """The streamed counterpart of prepare_data: ({"train", "eval"} Ray Datasets
        tokenised on the cluster, (train rows, eval rows), the manifest's data record).
        `cpus`: per Ray Data task (streamed.task_args)."""
        raise NotImplementedError

    def describe_data(self) -> str:
        raise NotImplementedError

    max_length_cap: Optional[int] = None
    """Upper bound of a max_length chosen from the data (memory grows with it)."""

    def example_lengths(self, tokenizer, columns: tuple, limit: int) -> list[int]:
        """Token lengths of the examples made of these columns (untruncated, or up to
        `limit` where counting further would cost a tokenisation in full)."""
        raise NotImplementedError

    def _resolve_max_length(self, cfg: ResolvedTrainConfig, tokenizer,
                            columns: tuple) -> dict[str, Any]:
        """The config's max_length, or one chosen from (a sample of) the training
        examples, as self.max_length (the driver puts it in the run's config)."""
        given = cfg.data.max_length
        limit = model_limit(cfg.modeling.model, tokenizer)
        if given and given > limit:
            raise ConfigError(f"invalid config field 'max_length': {given} is more "
                              f"tokens than the model takes ({limit}, from its config)")
        if self.max_length_cap:
            limit = min(limit, self.max_length_cap)
        n = len(columns[0])
        if n > 20_000:
            pick = np.random.default_rng(cfg.optim.seed).choice(n, 20_000, replace=False)
            columns = tuple([col[i] for i in pick] for col in columns)
        lengths = self.example_lengths(tokenizer, columns, limit)
        source = "config" if given else "data"
        chosen = given or choose_max_length(lengths, limit)
        self.max_length = chosen
        arr = np.asarray(lengths)
        return {"value": chosen, "source": source, "p50": int(np.median(arr)),
                "p99": int(np.quantile(arr, 0.99)), "longest": int(arr.max()),
                "limit": limit, "truncated_share": round(float(np.mean(arr > chosen)), 4)}

    def describe_eval(self, ev: dict[str, Any]) -> str:
        raise NotImplementedError

    def summary(self, metrics: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    def manifest_fields(self) -> dict[str, Any]:
        return {}

    def choose_settings(self, cfg: ResolvedTrainConfig, train_rows: int,
                        out=print) -> ResolvedTrainConfig:
        """The run's config with what the model and data decide (after prepare_data);
        the choices are printed with why, and recorded by manifest_fields."""
        return cfg

    def is_head_parameter(self, name: str) -> bool:
        """Whether a named parameter is the new head's (head_learning_rate applies)."""
        return False

    def prefer_last(self, best: dict[str, Any], last: dict[str, Any]) -> tuple[bool, str]:
        """(publish the last checkpoint instead of the best evaluation?, why, or "" to
        say nothing), given both checkpoints' reported metrics. The best, here."""
        return False, ""

    # ---- worker side -----------------------------------------------------------
    def build_model(self, tokenizer, empty: bool = False):
        """The model to train, its weights read from the model reference; `empty`: the
        same model on the meta device, no weights read (an FSDP rank other than 0,
        which gets its shards from rank 0)."""
        raise NotImplementedError

    def dataset(self, split: EncodedSplit):
        raise NotImplementedError

    def collate(self, items) -> dict:
        raise NotImplementedError

    def loss_sum(self, model, batch: dict, autocast):
        """The summed (not averaged) loss of the batch's examples, a scalar tensor."""
        raise NotImplementedError

    def loss_denominator(self, split: EncodedSplit, indices: Sequence[int]) -> float:
        """What loss_sum over these examples is divided by to give their mean loss."""
        raise NotImplementedError

    def eval_chunks(self, split: EncodedSplit, rank: int, world: int, batch_size: int):
        """This rank's eval batches (module eval_chunks) as (dataset items, counted)."""
        dataset = self.dataset(split)
        for indices, counted in eval_chunks(split, rank, world, batch_size):
            yield [dataset[i] for i in indices], counted

    def evaluate_chunks(self, model, chunks, world: int, device,
                        autocast) -> dict[str, Any]:
        """The eval metrics of the batches every rank is given in `chunks` ((dataset
        items, counted) pairs: each rank its own share, the same number on every
        rank, those not counted run only for FSDP's gathers), exact over all ranks."""
        raise NotImplementedError

    def evaluate(self, model, split: EncodedSplit, rank: int, world: int, batch_size: int,
                 device, autocast) -> dict[str, Any]:
        return self.evaluate_chunks(model, self.eval_chunks(split, rank, world, batch_size),
                                    world, device, autocast)

    def items_denominator(self, items: Sequence) -> float:
        """loss_denominator of dataset items (a streamed micro-batch's)."""
        raise NotImplementedError

    def state_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The metrics written to train_state.json in the checkpoint."""
        return metrics

    def save(self, model, folder: str, tokenizer) -> None:
        """Write the model into a checkpoint folder (the loop adds `tokenizer`'s
        files beside it)."""
        model.save_pretrained(folder, safe_serialization=True)

    def load_weights(self, model, folder: str) -> None:
        """Load the weights `save` wrote into `model` (resuming from a checkpoint)."""
        load_saved_weights(model, folder)


RESUME_ONLY_FILES = ("trainer_state.safetensors", "adapter.safetensors", SHARDED_DIR)
"""Checkpoint files (and the folder of an FSDP run's shards) that only resuming needs;
they are not published."""


def load_saved_weights(model, folder: str) -> None:
    """Every *.safetensors weight file of a save_pretrained folder into `model`."""

    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        if os.path.basename(path) not in RESUME_ONLY_FILES:
            state.update(load_file(path))
    if not state:
        raise FileNotFoundError(f"no weights in checkpoint {folder}")
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint does not fit the model: unexpected weights "
                         f"{result.unexpected_keys[:5]}")


def all_reduce(values, device, world: int):
    """Sum a float64 vector over ranks (no-op on one worker)."""
    import torch

    packed = torch.as_tensor(values, dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist

        packed = packed.to(device)
        dist.all_reduce(packed)
        packed = packed.cpu()
    return packed


def resolve_class_weights(spec: Optional[str], labels: list[str],
                          counts: list[int]) -> Optional[list[float]]:
    """Loss weight per class id: None, 'balanced' (n / (k x count)) or label=weight."""
    if not spec:
        return None
    parsed = parse_class_weights(spec)
    if parsed == "balanced":
        total, k = sum(counts), len(counts)
        return [total / (k * max(1, c)) for c in counts]
    unknown = sorted(set(parsed) - set(labels))
    if unknown:
        raise ConfigError(f"invalid config field 'class_weights': label(s) "
                          f"{', '.join(map(repr, unknown))} not in the training data "
                          f"(labels: {', '.join(labels)})")
    return [float(parsed.get(lab, 1.0)) for lab in labels]


def _shard_by_length(split: EncodedSplit, rank: int, world: int) -> list[int]:
    """This rank's share (rank::world), sorted by length so padding is minimal."""
    indices = list(range(rank, len(split), world))
    indices.sort(key=lambda i: split.offsets[i + 1] - split.offsets[i])
    return indices


def eval_chunks(split: EncodedSplit, rank: int, world: int,
                batch_size: int) -> list[tuple[list[int], bool]]:
    """This rank's eval batches (its share, by length) as (indices, counted). Every
    rank runs the same number of batches, since an FSDP forward gathers weights from
    all ranks: a rank whose share ran out runs the split's first example, not counted."""
    indices = _shard_by_length(split, rank, world)
    most = math.ceil(math.ceil(len(split) / world) / batch_size)
    chunks = [(indices[k:k + batch_size], True) for k in range(0, len(indices), batch_size)]
    return chunks + [([0], False)] * (most - len(chunks))


# ---- classification --------------------------------------------------------------
class _Examples:
    """A map-style dataset over an EncodedSplit: index -> (token ids, label) for
    classification, (token ids, loss mask) for generation."""

    def __init__(self, split: EncodedSplit, second: str):
        self.split = split
        self.second = self._label if second == "label" else split.mask

    def _label(self, i: int) -> int:
        return int(self.split.labels[i])

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        if self.split.positions is not None:  # a packed sequence
            return self.split.example(i), self.second(i), self.split.position(i)
        return self.split.example(i), self.second(i)


def stream_rows(source: DataSource, d, seed: int, cpus: Optional[float], make_rows,
                first: tuple[str, Optional[str], Sequence[str]],
                second: tuple[str, Optional[str], Sequence[str]], more=None):
    """`source` read on the cluster as the rows `make_rows` (streamed.labelled_rows or
    pair_rows) makes of its two columns: (rows, first column, second column, `more`'s
    keyword arguments). `first`, `second`: (role, the column the config names or None,
    the names guessed otherwise); make_rows takes them as `<role>_column`. `more(names,
    first column, second column)`: further keyword arguments of make_rows."""
    raw = streamed.read(source, d.columns, cpus)
    names = streamed.columns_of(raw, source)
    col1, col2 = pick_columns(source.shown, names, first, second,
                              d.columns is None and source.fmt in ("csv", "tsv"))
    extra = more(names, col1, col2) if more else {}
    rows = raw.map_batches(make_rows, batch_format="pandas",
                           fn_kwargs={f"{first[0]}_column": col1, f"{second[0]}_column": col2,
                                      **extra, "columns": d.columns,
                                      "seed": seed, "where": source.shown},
                           **streamed.task_args(cpus))
    return rows, col1, col2, extra


def held_out_none(d, n_train: int) -> DataError:
    """The error of a streamed hash split that left no training row for eval."""
    return DataError(f"{d.train}: the hash split held out none of its {n_train} rows "
                     f"for eval (--eval-fraction {d.eval_fraction}); pass --eval or a "
                     "larger --eval-fraction")


def tokenised_splits(tokenise, rows, eval_rows, cpus: Optional[float],
                     train_kwargs: dict[str, Any], eval_kwargs: dict[str, Any]):
    """{"train", "eval"} Ray Datasets that `tokenise` (streamed.tokenised_labelled or
    tokenised_pairs) makes of the training rows' train part and of the eval file's rows
    (`eval_rows`, all of them) or, without one, the training rows' held-out part."""
    return {
        "train": rows.map_batches(tokenise, batch_format="pandas",
                                  fn_kwargs={**train_kwargs, "part": "train"},
                                  **streamed.task_args(cpus)),
        "eval": (eval_rows or rows).map_batches(
            tokenise, batch_format="pandas",
            fn_kwargs={**eval_kwargs, "part": "eval" if eval_rows is None else "all"},
            **streamed.task_args(cpus))}


SMALL_DATA_ROWS = 5000
"""With small_data auto, training sets below this many rows get small-data settings."""
SMALL_DATA_MIN_STEPS = 400
"""Optimizer steps a small-data run takes at least (by its epochs)..."""
SMALL_DATA_MAX_EPOCHS = 20
"""... in at most this many epochs."""
SMALL_DATA_LEARNING_RATE = 5e-5
SMALL_DATA_WARMUP_RATIO = 0.1
SMALL_DATA_HEAD_LEARNING_RATE = 1e-3
"""The new head starts from random weights: it learns faster than the encoder."""
# docs/quality.md ("Small training sets") says why each value is what it is.


def small_data_settings(cfg: ResolvedTrainConfig, train_rows: int) -> dict[str, Any]:
    """Whether small-data settings apply (mode, rows) and the optimizer fields they
    set: only those the user left to the defaults (cfg.defaulted), and the head's
    learning rate where it and the learning rate are unset. {"applied", "why",
    "settings"}."""
    o = cfg.optim
    mode = o.small_data
    applied = mode == "on" or (mode == "auto" and train_rows < SMALL_DATA_ROWS)
    if mode == "auto":
        side = "below" if applied else "at least"
        why = f"{train_rows} training rows, {side} {SMALL_DATA_ROWS}, with --small-data auto"
    else:
        why = f"--small-data {mode}"
    settings: dict[str, Any] = {}
    if applied:
        steps_per_epoch = max(1, math.ceil(train_rows / o.batch_size))
        if "epochs" in cfg.defaulted:
            wanted = math.ceil(SMALL_DATA_MIN_STEPS / steps_per_epoch)
            settings["epochs"] = int(min(SMALL_DATA_MAX_EPOCHS, max(o.epochs, wanted)))
        if "learning_rate" in cfg.defaulted:
            settings["learning_rate"] = SMALL_DATA_LEARNING_RATE
        if "warmup_ratio" in cfg.defaulted:
            settings["warmup_ratio"] = SMALL_DATA_WARMUP_RATIO
        # A learning rate the user gave sets the pace of the whole model: the head's
        # is raised only along with the encoder's default.
        if o.head_learning_rate is None and "learning_rate" in cfg.defaulted:
            settings["head_learning_rate"] = SMALL_DATA_HEAD_LEARNING_RATE
        kept = [f for f in ("epochs", "learning_rate", "warmup_ratio")
                if f not in cfg.defaulted]
        if kept:
            why += f"; kept as given: {', '.join(kept)}"
    return {"mode": mode, "applied": applied, "why": why, "train_rows": train_rows,
            "settings": settings}


class ClassificationTask(Task):
    name = CLASSIFICATION
    defaults = TASK_DEFAULTS[CLASSIFICATION]
    metric = "eval_accuracy"
    metric_mode = "max"

    def __init__(self, cfg: ResolvedTrainConfig, model_ref: Optional[str] = None):
        super().__init__(cfg, model_ref)
        self.id2label: dict[int, str] = {}
        self.class_weights: Optional[list[float]] = None
        self.pooling: str = cfg.modeling.pooling
        self.choices: dict[str, Any] = {}
        """What choose_settings chose and why (the manifest's pooling and small_data)."""

    @property
    def label_names(self) -> list[str]:  # type: ignore[override]
        return [self.id2label[i] for i in range(len(self.id2label))]

    def prepare_data(self, cfg, tokenizer):
        d = cfg.data
        train, (tr_texts, tr_labels), (ev_texts, ev_labels), eval_info, split = \
            self._load_splits(cfg)
        where = f"{d.train}: " if d.eval else (
            f"{d.train}: the {len(tr_labels)} rows left for training after holding out "
            f"{len(ev_labels)} for eval (--eval-fraction {d.eval_fraction}; or pass --eval): ")
        labelset = LabelSet.from_labels(tr_labels, where=where)
        tr_ids = labelset.encode(tr_labels)
        ev_ids = labelset.encode(ev_labels, where=f"{d.eval or d.train}: ")
        self.eval_rows = (list(ev_texts), [str(lab) for lab in ev_labels])
        self.id2label = labelset.id2label
        self.pad_id = tokenizer.pad_token_id
        length_info = self._resolve_max_length(cfg, tokenizer, (tr_texts,))
        counts = np.bincount(np.asarray(tr_ids), minlength=len(labelset)).tolist()
        self.class_weights = resolve_class_weights(cfg.optim.class_weights, self.label_names,
                                                   counts)
        data = {
            "train": encode_texts(tokenizer, tr_texts, tr_ids, self.max_length, desc="train"),
            "eval": encode_texts(tokenizer, ev_texts, ev_ids, self.max_length, desc="eval"),
        }
        info = {"train": {"path": train.path, "sha256": train.sha256,
                          "rows": len(train.texts), "text_column": train.text_column,
                          "label_column": train.label_column,
                          "label_counts": dict(zip(self.label_names, counts))},
                "eval": eval_info, "split": split, "max_length": length_info,
                "class_weights": (dict(zip(self.label_names, self.class_weights))
                                  if self.class_weights else None)}
        return data, info

    def prepare_stream(self, cfg, tokenizer, train, evald, cpus):
        d, seed = cfg.data, cfg.optim.seed
        fraction = 0.0 if evald else d.eval_fraction

        def rows_of(source):
            rows, tcol, lcol, _ = stream_rows(
                source, d, seed, cpus, streamed.labelled_rows,
                ("text", d.text_column, TEXT_COLUMN_CANDIDATES),
                ("label", d.label_column, LABEL_COLUMN_CANDIDATES))
            return rows, tcol, lcol

        rows, tcol, lcol = rows_of(train)
        found = streamed.scan(rows, train, fraction, classes=True)
        keep = found.keep()
        n_train, n_eval = found.train_eval(classes=True)
        train_counts = {k: tr + (ev if k in keep else 0) for k, (tr, ev) in found.counts.items()}
        labelset = LabelSet.from_labels([k for k, n in train_counts.items() if n],
                                        where=f"{d.train}: ")
        eval_rows = ev_found = None
        if evald:
            eval_rows, _, _ = rows_of(evald)
            ev_found = streamed.scan(eval_rows, evald, 0.0, classes=True)
            labelset.encode(list(ev_found.counts), where=f"{d.eval}: ")
            n_eval = ev_found.rows
        elif n_eval == 0:
            raise held_out_none(d, n_train)
        self.id2label = labelset.id2label
        self.pad_id = tokenizer.pad_token_id
        length_info = self._resolve_max_length(cfg, tokenizer, ([a for a, _ in found.sample],))
        counts = [train_counts[name] for name in self.label_names]
        self.class_weights = resolve_class_weights(cfg.optim.class_weights, self.label_names,
                                                   counts)
        tokenise = {"fraction": fraction, "keep": keep, "model_ref": self.model_ref,
                    "label_ids": {name: i for i, name in enumerate(self.label_names)},
                    "max_length": self.max_length}
        datasets = tokenised_splits(streamed.tokenised_labelled, rows, eval_rows, cpus,
                                    {**tokenise, "where": train.shown},
                                    {**tokenise, "where": (evald or train).shown})
        info = {"train": {**identity(train), "rows": found.rows, "text_column": tcol,
                          "label_column": lcol,
                          "label_counts": dict(zip(self.label_names, counts))},
                "eval": {**identity(evald), "rows": n_eval} if evald else None,
                "split": None if evald else {
                    "method": "hash of the row (text, label): each label held out at the "
                              "same rate", "eval_fraction": d.eval_fraction, "seed": seed,
                    "train_rows": n_train, "eval_rows": n_eval,
                    "kept_in_training": keep},
                "max_length": length_info,
                "class_weights": (dict(zip(self.label_names, self.class_weights))
                                  if self.class_weights else None)}
        return datasets, (n_train, n_eval), info

    @staticmethod
    def _load_splits(cfg: ResolvedTrainConfig):
        """(the training file's data, train (texts, labels), eval (texts, labels), the
        eval file's info, how eval was held out): from --eval, or a stratified share."""
        d, seed = cfg.data, cfg.optim.seed
        train = load_labelled(d.train, d.text_column, d.label_column, d.columns)
        if d.eval:
            # Columns not named in the config are found in each file on its own: an
            # eval file may call its text 'sentence' where the train file says 'text'.
            evald = load_labelled(d.eval, d.text_column, d.label_column, d.columns)
            eval_info = {"path": evald.path, "sha256": evald.sha256, "rows": len(evald.texts)}
            return (train, (train.texts, train.labels), (evald.texts, evald.labels),
                    eval_info, None)
        tr_idx, ev_idx = stratified_split_indices(train.labels, d.eval_fraction, seed)

        def pick(idx):
            return [train.texts[i] for i in idx], [train.labels[i] for i in idx]

        split = {"method": "stratified by label", "eval_fraction": d.eval_fraction,
                 "seed": seed, "train_rows": len(tr_idx), "eval_rows": len(ev_idx)}
        return train, pick(tr_idx), pick(ev_idx), None, split

    def example_lengths(self, tokenizer, columns, limit):
        (texts,) = columns
        enc = tokenizer(list(texts), truncation=True, max_length=limit)
        return [len(ids) for ids in enc["input_ids"]]

    def describe_data(self) -> str:
        return f"labels: {', '.join(self.label_names)}"

    def describe_eval(self, ev):
        return (f"epoch {ev['epoch']} eval: accuracy {ev['eval_accuracy']:.4f} "
                f"macro-F1 {ev['eval_macro_f1']:.4f} loss {ev['eval_loss']:.4f}")

    def summary(self, metrics):
        out = evaluation_summary({k.removeprefix("eval_"): v for k, v in metrics.items()
                                  if k.startswith("eval_") and isinstance(v, (int, float))})
        out["loss"] = float(metrics.get("eval_loss", float("nan")))
        return out

    def choose_settings(self, cfg, train_rows, out=print):
        """The pooling (services.core.pooling) and the small-data settings."""
        pooling, pooling_why = resolve_pooling(cfg.modeling.pooling, self.model_ref)
        small = small_data_settings(cfg, train_rows)
        self.pooling = pooling
        out(f"pooling: {pooling} ({pooling_why})")
        if small["applied"]:
            chosen = ", ".join(f"{k} {v:g}" for k, v in small["settings"].items())
            out(f"small-data settings: {chosen or 'none left to choose'} ({small['why']}); "
                "--small-data off turns them off")
        chosen_cfg = cfg.with_choices(pooling, **small["settings"])
        head_lr = chosen_cfg.optim.head_learning_rate
        self.choices = {"pooling": {"value": pooling, "why": pooling_why},
                        "small_data": {**small, "optim": {
                            "epochs": chosen_cfg.optim.epochs,
                            "learning_rate": chosen_cfg.optim.learning_rate,
                            "warmup_ratio": chosen_cfg.optim.warmup_ratio,
                            "head_learning_rate": head_lr or chosen_cfg.optim.learning_rate}}}
        return chosen_cfg

    def manifest_fields(self):
        return dict(self.choices)

    def is_head_parameter(self, name):
        return is_head_parameter(name)

    def prefer_last(self, best, last):
        return last_within_noise(best, last)

    def build_model(self, tokenizer, empty=False):
        pooling = self.pooling
        if pooling == "auto":  # choose_settings not run (a task made by hand)
            pooling = resolve_pooling(pooling, self.model_ref)[0]
        return load_classifier_for_training(self.model_ref, self.id2label, self.pad_id,
                                            pooling=pooling, empty=empty)

    def load_weights(self, model, folder):
        load_saved_weights(unwrap(model), folder)

    def dataset(self, split):
        return _Examples(split, "label")

    def collate(self, items):
        import torch

        ids, mask = pad_batch([ex for ex, _ in items], self.pad_id)
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([lab for _, lab in items], dtype=torch.long)}

    def loss_sum(self, model, batch, autocast):
        import torch
        import torch.nn.functional as F

        with autocast():
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
        weight = None
        if self.class_weights:
            weight = torch.tensor(self.class_weights, dtype=torch.float, device=logits.device)
        return F.cross_entropy(logits.float(), batch["labels"], weight=weight,
                               reduction="sum")

    def loss_denominator(self, split, indices):
        """Examples, or the sum of their class weights (cross-entropy's weighted mean)."""
        if self.class_weights:
            return float(np.asarray(self.class_weights)[split.labels[list(indices)]].sum())
        return float(len(indices))

    def items_denominator(self, items):
        if self.class_weights:
            return float(sum(self.class_weights[int(lab)] for _, lab in items))
        return float(len(items))

    def evaluate_chunks(self, model, chunks, world, device, autocast):
        """Exact over all ranks: confusion matrices, loss sums and counts all-reduced."""
        import torch
        import torch.nn.functional as F

        n_labels = len(self.id2label)
        cm = torch.zeros((n_labels, n_labels), dtype=torch.long)
        loss_sum, count = 0.0, 0
        model.eval()
        with torch.inference_mode():
            for chunk, counted in chunks:
                ids, mask = pad_batch([ex for ex, _ in chunk], self.pad_id)
                labels = torch.tensor([int(lab) for _, lab in chunk], dtype=torch.long)
                with autocast():
                    logits = model(input_ids=ids.to(device),
                                   attention_mask=mask.to(device)).logits
                if not counted:
                    continue
                logits = logits.float().cpu()
                loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
                pred = logits.argmax(dim=-1)
                cm.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
                count += len(chunk)
        model.train()
        packed = all_reduce([*cm.flatten().tolist(), loss_sum, count], device, world)
        cm = packed[:-2].round().long().view(n_labels, n_labels).tolist()
        n = int(round(float(packed[-1])))
        m = metrics_from_confusion(cm, self.label_names)
        return {"eval_loss": float(packed[-2]) / max(1, n), "eval_examples": n,
                "confusion_matrix": cm,
                **{f"eval_{k}": v for k, v in m.items() if k != "per_class"},
                "eval_per_class": m["per_class"]}

    def state_metrics(self, metrics):
        return {k: v for k, v in metrics.items()
                if k not in ("confusion_matrix", "eval_per_class")}


# ---- generation ------------------------------------------------------------------
def lm_batch(items, pad_id: int):
    """Right-padded input_ids, attention_mask and labels (-100 off the response)."""
    import torch

    ids, mask = pad_batch([item[0] for item in items], pad_id)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, (ex, loss_mask, *_) in enumerate(items):
        target = torch.from_numpy(ex.astype(np.int64))
        target[~torch.from_numpy(np.asarray(loss_mask, dtype=np.bool_))] = IGNORE_INDEX
        labels[row, :len(ex)] = target
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed_lm_batch(items, pad_id: int):
    """lm_batch of packed sequences ((ids, loss mask, positions) items): position_ids
    restart at 0 with each example and there is no attention_mask, so that the model
    builds a block-diagonal causal mask from the position_ids (transformers'
    packed-sequence detection; flash attention takes its variable-length path) and no
    example attends to another. Each example's first token gets no loss (it would be
    predicted from the example before it); the right padding is a segment of its own,
    which no real token attends to (causal) and which has no loss."""
    import torch

    batch = lm_batch(items, pad_id)
    ids, labels = batch["input_ids"], batch["labels"]
    position_ids = torch.zeros_like(ids)
    for row, (ex, _, positions) in enumerate(items):
        n = len(ex)
        pos = torch.from_numpy(np.asarray(positions, dtype=np.int64))
        position_ids[row, :n] = pos
        position_ids[row, n:] = torch.arange(ids.shape[1] - n)
        labels[row, :n][pos == 0] = IGNORE_INDEX
    del batch["attention_mask"]
    batch["position_ids"] = position_ids
    return batch


def lm_inputs(batch: dict, device=None) -> dict:
    """The model's keyword arguments for a (packed_)lm_batch, moved to `device`. A
    packed batch runs without a KV cache: transformers only derives the packed mask
    from position_ids when there is none (and training needs none)."""
    packed = "position_ids" in batch
    keys = ("input_ids", "position_ids") if packed else ("input_ids", "attention_mask")
    inputs = {k: batch[k] if device is None else batch[k].to(device) for k in keys}
    if packed:
        inputs["use_cache"] = False
    return inputs


def token_nll(logits, labels):
    """(sum of next-token NLL over target tokens, number of target tokens)."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                          shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="sum")
    return nll, int((shift_labels != IGNORE_INDEX).sum())


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 100.0))


class GenerationTask(Task):
    name = GENERATION
    defaults = TASK_DEFAULTS[GENERATION]
    metric = "eval_loss"
    metric_mode = "min"

    def __init__(self, cfg: ResolvedTrainConfig, model_ref: Optional[str] = None):
        super().__init__(cfg, model_ref)
        self.prompt_template: Optional[str] = cfg.data.prompt_template
        self.packing: bool = cfg.data.packing
        self.lora = None
        m = cfg.modeling
        if m.lora_r:
            self.lora = {"r": m.lora_r, "lora_alpha": m.lora_alpha,
                         "lora_dropout": m.lora_dropout,
                         "target_modules": None if m.lora_target_modules is None
                         else list(m.lora_target_modules)}
        self.stats: dict[str, Any] = {}

    def prepare_data(self, cfg, tokenizer):
        check_causal_lm(cfg.modeling.model)
        train, tr, ev, eval_info, split = self._load_splits(cfg)
        self.pad_id = tokenizer.pad_token_id
        length_info = self._resolve_max_length(cfg, tokenizer, tr)
        train_split, train_stats = encode_pairs(tokenizer, *tr, self.prompt_template,
                                                self.max_length, packing=self.packing,
                                                desc="train")
        # Eval is never packed: its loss is over each example on its own.
        eval_split, eval_stats = encode_pairs(tokenizer, *ev, self.prompt_template,
                                              self.max_length, desc="eval")
        self.stats = {"train": train_stats, "eval": eval_stats}
        info = {"train": {"path": train.path, "sha256": train.sha256,
                          "rows": len(train.prompts), "prompt_column": train.prompt_column,
                          "response_column": train.response_column, **train_stats},
                "eval": {**(eval_info or {}), **eval_stats}, "split": split,
                "max_length": length_info}
        return {"train": train_split, "eval": eval_split}, info

    @staticmethod
    def _load_splits(cfg: ResolvedTrainConfig):
        """(the training file's pairs, train (prompts, responses), eval (prompts,
        responses), the eval file's info, how eval was held out)."""
        d, seed = cfg.data, cfg.optim.seed
        train = load_pairs(d.train, d.prompt_column, d.response_column, d.columns)
        if d.eval:
            evald = load_pairs(d.eval, d.prompt_column, d.response_column, d.columns)
            eval_info = {"path": evald.path, "sha256": evald.sha256,
                         "rows": len(evald.prompts)}
            return (train, (train.prompts, train.responses),
                    (evald.prompts, evald.responses), eval_info, None)
        tr_idx, ev_idx = split_indices(len(train.prompts), d.eval_fraction, seed)

        def pick(idx):
            return [train.prompts[i] for i in idx], [train.responses[i] for i in idx]

        split = {"eval_fraction": d.eval_fraction, "seed": seed,
                 "train_rows": len(tr_idx), "eval_rows": len(ev_idx)}
        return train, pick(tr_idx), pick(ev_idx), None, split

    max_length_cap = 1024

    def example_lengths(self, tokenizer, columns, limit):
        prompts, responses = columns
        p_ids = tokenizer([render_prompt(self.prompt_template, p) for p in prompts],
                          add_special_tokens=True)["input_ids"]
        r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
        # Whole lengths (tokenised in full anyway): the manifest's length statistics
        # and truncated share are the data's, not capped at the limit.
        return [len(p) + len(r) + 1 for p, r in zip(p_ids, r_ids)]

    def prepare_stream(self, cfg, tokenizer, train, evald, cpus):
        check_causal_lm(cfg.modeling.model)
        d, seed = cfg.data, cfg.optim.seed
        fraction = 0.0 if evald else d.eval_fraction

        def rows_of(source):
            rows, pcol, rcol, more = stream_rows(
                source, d, seed, cpus, streamed.pair_rows,
                ("prompt", d.prompt_column, PROMPT_COLUMN_CANDIDATES),
                ("response", d.response_column, RESPONSE_COLUMN_CANDIDATES),
                more=lambda names, pcol, rcol: {
                    "extra": alpaca_input(d.prompt_column, pcol, rcol, names)})
            extra = more["extra"]
            return rows, (f"{pcol}+{extra}" if extra else pcol), rcol

        rows, pcol, rcol = rows_of(train)
        found = streamed.scan(rows, train, fraction, classes=False)
        n_train, n_eval = found.train_eval(classes=False)
        eval_rows = None
        if evald:
            eval_rows, _, _ = rows_of(evald)
            n_eval = streamed.scan(eval_rows, evald, 0.0, classes=False).rows
        elif n_eval == 0:
            raise held_out_none(d, n_train)
        self.pad_id = tokenizer.pad_token_id
        sample = found.sample
        length_info = self._resolve_max_length(cfg, tokenizer, ([a for a, _ in sample],
                                                                [b for _, b in sample]))
        tokenise = {"fraction": fraction, "model_ref": self.model_ref,
                    "template": self.prompt_template, "max_length": self.max_length}
        # Eval is never packed: its loss is over each example on its own.
        datasets = tokenised_splits(streamed.tokenised_pairs, rows, eval_rows, cpus,
                                    {**tokenise, "packing": self.packing},
                                    {**tokenise, "packing": False})
        self.stats = {"train": {"examples": n_train}, "eval": {"examples": n_eval}}
        info = {"train": {**identity(train), "rows": found.rows, "prompt_column": pcol,
                          "response_column": rcol, "examples": n_train},
                "eval": {**(identity(evald) if evald else {}), "examples": n_eval},
                "split": None if evald else {
                    "method": "hash of the row (prompt, response)",
                    "eval_fraction": d.eval_fraction, "seed": seed,
                    "train_rows": n_train, "eval_rows": n_eval},
                "max_length": length_info}
        return datasets, (n_train, n_eval), info

    def describe_data(self) -> str:
        tr, ev = self.stats["train"], self.stats["eval"]
        if "target_tokens" not in tr:  # streamed: tokenised on the cluster as it trains
            return (f"generation: {tr['examples']} train pairs, {ev['examples']} eval pairs "
                    "(tokenised on the cluster as they stream)")
        text = (f"generation: {tr['examples']} train pairs ({tr['target_tokens']} target "
                f"tokens), {ev['examples']} eval pairs")
        if tr["truncated"] or ev["truncated"]:
            text += f"; {tr['truncated'] + ev['truncated']} truncated to max_length"
        if self.packing:
            text += f"; packed into {tr['sequences']} sequences"
        return text

    def describe_eval(self, ev):
        return (f"epoch {ev['epoch']} eval: loss {ev['eval_loss']:.4f} "
                f"perplexity {ev['eval_perplexity']:.3f}")

    def summary(self, metrics):
        loss = float(metrics.get("eval_loss", float("nan")))
        return {"loss": loss, "perplexity": float(metrics.get("eval_perplexity",
                                                              perplexity(loss)))}

    def manifest_fields(self) -> dict[str, Any]:
        return {"prompt_template": self.prompt_template, "lora": self.lora}

    def build_model(self, tokenizer, empty=False):
        return load_causal_lm_for_training(self.model_ref, tokenizer, lora=self.lora,
                                           empty=empty)

    def dataset(self, split):
        return _Examples(split, "mask")

    def collate(self, items):
        if len(items[0]) == 3:
            return packed_lm_batch(items, self.pad_id)
        return lm_batch(items, self.pad_id)

    def loss_sum(self, model, batch, autocast):
        with autocast():
            logits = model(**lm_inputs(batch)).logits
        return token_nll(logits, batch["labels"])[0]

    def loss_denominator(self, split, indices):
        """Target tokens: the loss mask after each example's first token (token_nll
        predicts token t from those before it; a packed sequence holds several)."""
        if split.positions is not None:
            return float(sum(int((split.mask(i) & (split.position(i) > 0)).sum())
                             for i in indices))
        return float(sum(int(split.mask(i)[1:].sum()) for i in indices))

    def items_denominator(self, items):
        total = 0
        for item in items:
            mask = np.asarray(item[1], dtype=np.bool_)
            if len(item) == 3:  # packed: no loss on each example's first token
                total += int((mask & (np.asarray(item[2]) > 0)).sum())
            else:
                total += int(mask[1:].sum())
        return float(total)

    def evaluate_chunks(self, model, chunks, world, device, autocast):
        """Mean NLL over every target token of the split, exact over all ranks."""
        import torch

        loss_sum, tokens, examples = 0.0, 0, 0
        model.eval()
        with torch.inference_mode():
            for chunk, counted in chunks:
                batch = lm_batch([(item[0], item[1]) for item in chunk], self.pad_id)
                with autocast():
                    logits = model(input_ids=batch["input_ids"].to(device),
                                   attention_mask=batch["attention_mask"].to(device)).logits
                if not counted:
                    continue
                nll, n = token_nll(logits.float().cpu(), batch["labels"])
                loss_sum += float(nll)
                tokens += n
                examples += len(chunk)
        model.train()
        loss_sum, tokens, examples = all_reduce([loss_sum, tokens, examples], device,
                                                 world).tolist()
        loss = loss_sum / max(1.0, tokens)
        return {"eval_loss": loss, "eval_perplexity": perplexity(loss),
                "eval_examples": int(round(examples)), "eval_tokens": int(round(tokens))}

    def load_weights(self, model, folder):
        if not self.lora:
            return load_saved_weights(model, folder)
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(os.path.join(folder, "adapter.safetensors")))

    def save(self, model, folder, tokenizer):
        """The model (LoRA merged in) with a generation config that stops at every
        EOS it was trained on: fine-tuning appended the tokenizer's EOS to each
        response, and the base model's config may name another (plain Hugging Face
        `generate` on the checkpoint stops right too)."""
        if self.lora:
            from peft import get_peft_model_state_dict
            from safetensors.torch import save_file

            adapter = {k: v.detach().cpu().contiguous()
                       for k, v in get_peft_model_state_dict(model).items()}
            save_file(adapter, os.path.join(folder, "adapter.safetensors"))
            # The published checkpoint is a plain model: the adapter merged in, on a
            # copy so that training goes on with the adapter separate.
            model = copy.deepcopy(model).merge_and_unload()
        eos = eos_token_ids(model.generation_config, tokenizer)
        model.generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos or None
        model.save_pretrained(folder, safe_serialization=True)
        with open(os.path.join(folder, GENERATION_FILE), "w", encoding="utf-8") as fh:
            json.dump({"task": self.name, "prompt_template": self.prompt_template,
                       "max_length": self.max_length, "lora": self.lora}, fh, indent=2)


TASK_CLASSES: dict[str, type[Task]] = {CLASSIFICATION: ClassificationTask,
                                       GENERATION: GenerationTask}
"""Every task name of services.core.config.TASKS, and the class that trains it."""


def task_for(name: str) -> type[Task]:
    """The Task class of a task name (ConfigError naming the field when there is none)."""
    try:
        return TASK_CLASSES[name]
    except KeyError:
        raise ConfigError(f"invalid config field 'task': must be one of "
                          f"{', '.join(TASK_CLASSES)}, got {name!r}") from None


def make_task(cfg: ResolvedTrainConfig, model_ref: Optional[str] = None) -> Task:
    """The task object for a resolved config (see Task.__init__ for `model_ref`)."""
    return task_for(cfg.task)(cfg, model_ref)
