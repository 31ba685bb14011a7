"""Training data as Ray Data streams: read and tokenised on the cluster, never on the driver.

Driver side: `decide` picks streaming (`--data-streaming auto|on|off`); `read` opens a
`services.core.sources.DataSource` as a Ray Dataset; `labelled_rows` / `pair_rows`
check each row and give it a hash of its content (which decides its split: the same on
every run and any number of workers); `scan` is one streaming pass for the row counts
(per label) and a sample for the max_length choice, the driver keeping only those; the
`tokenised_*` functions are the `map_batches` that tokenise on the cluster.

Worker side: Ray Train gives each worker its share of the "train" stream (split in equal
parts, so that every rank runs the same number of steps) and of the "eval" stream
(`StreamedSplits`); `StreamBatches` cuts the training stream into micro-batches of
similar lengths (sorted within windows of GROUP_BATCHES micro-batches, the batches of a
window in random order) and works out each accumulation group's loss denominator over
all ranks (one all-reduce per optimizer step).
"""

from __future__ import annotations

import csv
import heapq
import io
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from services.core.errors import DataError
from services.core.sources import DataSource
from services.training.encoded import EncodedSplit, encode_pairs, encode_texts
from services.training.sharding import GROUP_BATCHES, Micro

STREAM_MODES = ("auto", "on", "off")
STREAMING_MIN_BYTES = 64 * 2**20
"""With --data-streaming auto, data of at least this many bytes (all files together) is
streamed; below it, the driver reads and tokenises it (docs/design.md says why)."""
MAX_LABELS = 10_000
"""Distinct labels a streamed classification run accepts (the driver counts them)."""
LENGTH_SAMPLE = 20_000
"""Training rows whose token lengths choose max_length (the lowest sample keys)."""
SAMPLE_ROW_BYTES = 40
"""Bytes per row assumed to size the share of rows sent to the driver for that sample."""
SHUFFLE_ROWS = 8192
"""Rows of each worker's local shuffle buffer (the stream's order is the files')."""


def decide(mode: str, sources: Sequence[DataSource]) -> tuple[bool, str]:
    """Whether the run streams its data, and why (a line for the run's output)."""
    many = [s for s in sources if s.many]
    total = sum(s.total_bytes for s in sources)
    size = f"{total / 2**20:.1f} MiB"
    if mode == "on":
        return True, "--data-streaming on"
    if mode == "off":
        if many:
            raise DataError(f"{many[0].shown}: a folder or glob of files is read as a stream; "
                            "drop --data-streaming off (or name one file)")
        return False, "--data-streaming off"
    if many:
        return True, f"{many[0].shown} is a folder or glob of {len(many[0].paths)} file(s)"
    if total >= STREAMING_MIN_BYTES:
        return True, f"{size}, at least {STREAMING_MIN_BYTES // 2**20} MiB"
    return False, f"{size}, below {STREAMING_MIN_BYTES // 2**20} MiB"


# ---- reading --------------------------------------------------------------------
def quiet_ray_data() -> None:
    """Ray Data's progress bars and per-dataset log lines off (the run reports itself)."""
    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def task_args(cpus: Optional[float]) -> dict[str, Any]:
    """Ray Data task options: `cpus` per read or tokenise task; 0 when the training
    workers reserve every CPU, then one task at a time beside them."""
    if cpus is None:
        return {}
    if cpus <= 0:
        return {"num_cpus": 0, "concurrency": 1}
    return {"num_cpus": cpus}


def _head(source: DataSource, size: int = 1 << 16) -> bytes:
    path = source.paths[0]
    fs = source.filesystem()
    if fs is None:
        with open(path, "rb") as fh:
            return fh.read(size)
    with fs.open_input_stream(path) as fh:
        return fh.read(size)


def read(source: DataSource, columns: Optional[Sequence[str]] = None,
         cpus: Optional[float] = None):
    """The source as a Ray Dataset of its records (CSV/TSV fields as strings)."""
    import ray.data

    quiet_ray_data()
    kw: dict[str, Any] = dict(filesystem=source.filesystem(), file_extensions=None,
                              partitioning=None, **task_args(cpus))
    paths = list(source.paths)
    if source.fmt == "parquet":
        return ray.data.read_parquet(paths, **kw)
    head = _head(source)
    if source.fmt == "jsonl":
        if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[":
            raise DataError(f"{source.shown}: a JSON array is read whole; write it as JSON "
                            "Lines (one object per line) to stream it, or pass "
                            "--data-streaming off")
        return ray.data.read_json(paths, **kw)
    import pyarrow as pa
    import pyarrow.csv as pacsv

    delimiter = "\t" if source.fmt == "tsv" else ","
    text = head.decode("utf-8-sig", errors="replace")
    first = text.splitlines()[0] if text.strip() else ""
    quoted = source.fmt == "csv" or any(
        line.startswith('"') or '\t"' in line for line in text.splitlines())
    if columns:
        names = list(columns)
    else:
        names = [h.strip() for h in next(csv.reader(io.StringIO(first),
                                                     delimiter=delimiter), [])]
        if not any(names):
            raise DataError(f"{source.shown}: empty header row")
    return ray.data.read_csv(
        paths,
        read_options=pacsv.ReadOptions(column_names=list(columns) if columns else None),
        parse_options=pacsv.ParseOptions(delimiter=delimiter,
                                         quote_char='"' if quoted else False,
                                         newlines_in_values=quoted),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names}, strings_can_be_null=False),
        **kw)


def columns_of(ds, source: DataSource) -> list[str]:
    try:
        return list(ds.schema().names)
    except Exception as exc:
        raise as_data_error(exc, source) from None


def as_data_error(exc: BaseException, source: DataSource) -> DataError:
    """A DataError for a failure of a Ray Data pass: a row check's own message, or the
    reader's first line naming the source."""
    if isinstance(exc, DataError):
        return exc
    text = str(exc)
    ours = re.findall(r"services\.core\.errors\.DataError: (.*)", text)
    if ours:
        return DataError(ours[-1].strip())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    why = next((ln for ln in reversed(lines) if re.match(r"^[\w.]+(Error|Invalid)\b", ln)),
               lines[-1] if lines else type(exc).__name__)
    return DataError(f"cannot read {source.shown}: {why}")


# ---- rows: checked, normalised, hashed -------------------------------------------
def _row_hash(first: np.ndarray, second: np.ndarray, seed: int):
    """(split key, sample key) in [0, 1) of each row, from its two fields (text and
    label, or prompt and response) and the seed: the same for the same row on every
    run, file format and number of workers (SipHash, pandas.util.hash_array)."""
    import pandas as pd

    key = f"{seed % 2**64:016x}"
    a = pd.util.hash_array(first, hash_key=key, categorize=False)
    b = pd.util.hash_array(second, hash_key=key, categorize=False)
    h = a ^ ((b << np.uint64(29)) | (b >> np.uint64(35)))
    return ((h >> np.uint64(11)).astype(np.float64) * 2.0**-53,
            (h & np.uint64(0xFFFFFFFF)).astype(np.float64) * 2.0**-32)


def _drop_header_rows(df, columns: Optional[Sequence[str]]):
    """With --columns, a header naming the columns as --columns does is not data."""
    if not columns or not len(df):
        return df
    same = np.ones(len(df), dtype=bool)
    for c in columns:
        same &= (df[c].astype(str).str.strip() == c).to_numpy()
    return df[~same] if same.any() else df


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _strings(df, col: str, what: str, where: str) -> np.ndarray:
    """The column's values, every one a string with more than whitespace."""
    values = df[col].to_numpy(dtype=object)
    ok = np.fromiter((type(v) is str for v in values), dtype=bool, count=len(values))
    if not ok.all():
        v = values[int(np.argmin(ok))]
        if _is_missing(v):
            raise DataError(f"{where}: a row has no {what} in column '{col}'")
        raise DataError(f"{where}: {what} in column '{col}' is not a string: {str(v)[:60]!r}")
    if len(values) and not df[col].str.strip().astype(bool).all():
        raise DataError(f"{where}: empty {what} in column '{col}'")
    return values


def _label_text(v: Any, col: str, where: str) -> str:
    if isinstance(v, (bool, np.bool_)) or _is_missing(v):
        raise DataError(f"{where}: missing label in column '{col}'" if _is_missing(v) else
                        f"{where}: label must be a string or an integer, got {v!r}")
    if isinstance(v, (float, np.floating)):
        if not float(v).is_integer():
            raise DataError(f"{where}: label must be a string or an integer, got {v!r}")
        return str(int(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, str):
        if not v.strip():
            raise DataError(f"{where}: missing label in column '{col}'")
        return v.strip()
    raise DataError(f"{where}: label must be a string or an integer, got {str(v)[:60]!r}")


def _labels(df, col: str, where: str) -> np.ndarray:
    """Labels as text: integers (and whole floats, as a JSON or Parquet column with a
    null may hold them) as their digits, strings stripped."""
    import pandas as pd

    column = df[col]
    kind = column.dtype.kind
    if kind in "iu":
        return column.astype(str).to_numpy(dtype=object)
    if kind == "f" and column.notna().all() and (column == column.round()).all():
        return column.astype(np.int64).astype(str).to_numpy(dtype=object)
    values = column.to_numpy(dtype=object)
    if kind == "O" and all(type(v) is str for v in values):
        stripped = pd.Series(values).str.strip()
        if stripped.astype(bool).all():
            return stripped.to_numpy(dtype=object)
    return np.array([_label_text(v, col, where) for v in values], dtype=object)


def labelled_rows(df, *, text_column: str, label_column: str,
                  columns: Optional[Sequence[str]], seed: int, where: str):
    """(text, label, split key, sample key) of each record; a bad row is a DataError."""
    import pandas as pd

    df = _drop_header_rows(df, columns)
    texts = _strings(df, text_column, "text", where)
    labels = _labels(df, label_column, where)
    u, s = _row_hash(texts, labels, seed)
    return pd.DataFrame({"a": texts, "label": labels, "u": u, "s": s, "b": ""})


def pair_rows(df, *, prompt_column: str, response_column: str, extra: Optional[str],
              columns: Optional[Sequence[str]], seed: int, where: str):
    """(prompt, response, split key, sample key) of each record (Alpaca's `input`
    joined to its instruction, as services.core.data.load_pairs does)."""
    import pandas as pd

    df = _drop_header_rows(df, columns)
    prompts = _strings(df, prompt_column, "prompt", where)
    responses = _strings(df, response_column, "response", where)
    if extra is not None:
        prompts = prompts.copy()
        for i, more in enumerate(df[extra].tolist()):
            if isinstance(more, str) and more.strip():
                prompts[i] = f"{prompts[i]}\n\n{more}"
    u, s = _row_hash(prompts, responses, seed)
    return pd.DataFrame({"a": prompts, "b": responses, "u": u, "s": s, "label": ""})


def in_eval(df, fraction: float, keep: Sequence[str]) -> np.ndarray:
    """The rows held out for eval: split key below the fraction, except the rows of a
    label that would then have none left for training (`keep`)."""
    held = df["u"].to_numpy() < fraction
    if keep:
        held &= ~df["label"].isin(list(keep)).to_numpy()
    return held


def summarise(df, *, fraction: float, sample_below: float):
    """One batch's row counts per (label, eval) and the training rows whose sample key
    is below `sample_below` (kind 0: a count in n; kind 1: a sample row)."""
    import pandas as pd

    held = in_eval(df, fraction, ())
    counts = (pd.DataFrame({"label": df["label"], "held": held})
              .groupby(["label", "held"]).size().reset_index(name="n"))
    counts["kind"], counts["a"], counts["b"], counts["s"] = 0, "", "", 2.0
    picked = df[(df["s"].to_numpy() < sample_below) & ~held]
    sample = pd.DataFrame({"label": picked["label"], "held": False, "n": 0, "kind": 1,
                           "a": picked["a"], "b": picked["b"], "s": picked["s"]})
    return pd.concat([counts, sample], ignore_index=True)


@dataclass
class Scan:
    """What one streaming pass over the rows found."""

    counts: dict[str, list[int]]
    """label -> [rows the split key puts in training, rows it holds out]."""
    sample: list[tuple[str, str]]
    """Up to LENGTH_SAMPLE training rows: (text, "") or (prompt, response)."""

    @property
    def rows(self) -> int:
        return sum(a + b for a, b in self.counts.values())

    def keep(self) -> list[str]:
        """Labels every row of which stays in training: those the split key would leave
        without a training row (a label with one row, or a few all held out)."""
        return sorted(k for k, (tr, ev) in self.counts.items() if tr == 0 and ev > 0)

    def train_eval(self, classes: bool) -> tuple[int, int]:
        keep = set(self.keep()) if classes else set()
        train = sum(tr + (ev if k in keep else 0) for k, (tr, ev) in self.counts.items())
        return train, self.rows - train


def scan(rows, source: DataSource, fraction: float, classes: bool) -> Scan:
    """Counts and the max_length sample in one pass; the driver holds only those."""
    below = min(1.0, 4 * LENGTH_SAMPLE * SAMPLE_ROW_BYTES / max(1, source.total_bytes))
    counts: dict[str, list[int]] = {}
    heap: list[tuple[float, str, str]] = []
    summary = rows.map_batches(summarise, batch_format="pandas",
                               fn_kwargs={"fraction": fraction, "sample_below": below})
    try:
        for batch in summary.iter_batches(batch_format="pandas", batch_size=None):
            for kind, label, held, n, a, b, s in zip(batch["kind"], batch["label"],
                                                      batch["held"], batch["n"],
                                                      batch["a"], batch["b"], batch["s"]):
                if kind == 0:
                    counts.setdefault(label, [0, 0])[1 if held else 0] += int(n)
                    if classes and len(counts) > MAX_LABELS:
                        raise DataError(
                            f"{source.shown}: more than {MAX_LABELS} distinct labels; are "
                            "the text and label columns swapped?")
                elif len(heap) < LENGTH_SAMPLE:
                    heapq.heappush(heap, (-s, a, b))
                elif -heap[0][0] > s:
                    heapq.heapreplace(heap, (-s, a, b))
    except DataError:
        raise
    except Exception as exc:
        raise as_data_error(exc, source) from None
    if not counts:
        raise DataError(f"{source.shown}: no examples found")
    sample = [(a, b) for _, a, b in sorted(heap, key=lambda e: -e[0])]
    return Scan(counts, sample)


# ---- tokenising on the cluster ----------------------------------------------------
_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(model_ref: str):
    """One tokenizer per model in each Ray worker process (loaded once, reused)."""
    if model_ref not in _TOKENIZERS:
        from services.core.modeling import load_tokenizer, quiet_transformers

        quiet_transformers()
        _TOKENIZERS[model_ref] = load_tokenizer(model_ref)
    return _TOKENIZERS[model_ref]


def encoded_table(split: EncodedSplit):
    """A tokenised batch as an Arrow table: input_ids (and loss_mask, positions) as
    list columns, label and length."""
    import pyarrow as pa

    offsets = pa.array(split.offsets.astype(np.int32))
    cols = {"input_ids": pa.ListArray.from_arrays(offsets, pa.array(split.ids)),
            "label": pa.array(split.labels.astype(np.int64)),
            "length": pa.array(np.diff(split.offsets).astype(np.int32))}
    if split.loss_mask is not None:
        cols["loss_mask"] = pa.ListArray.from_arrays(offsets, pa.array(split.loss_mask))
    if split.positions is not None:
        cols["positions"] = pa.ListArray.from_arrays(offsets, pa.array(split.positions))
    return pa.table(cols)


def _part(df, part: str, fraction: float, keep: Sequence[str]):
    if part == "all":
        return df
    held = in_eval(df, fraction, keep)
    return df[held] if part == "eval" else df[~held]


def tokenised_labelled(df, *, part: str, fraction: float, keep: Sequence[str],
                       label_ids: dict[str, int], model_ref: str, max_length: int,
                       where: str):
    """A batch of labelled rows -> this part's (train, eval or all) token ids."""
    df = _part(df, part, fraction, keep)
    ids = []
    for lab in df["label"].tolist():
        if lab not in label_ids:
            raise DataError(f"{where}: label {lab[:40]!r} does not occur in the training "
                            f"data (known labels: {', '.join(list(label_ids)[:20])})")
        ids.append(label_ids[lab])
    return encoded_table(encode_texts(_tokenizer(model_ref), df["a"].tolist(), ids, max_length))


def tokenised_pairs(df, *, part: str, fraction: float, model_ref: str,
                    template: Optional[str], max_length: int, packing: bool):
    """A batch of prompt/response rows -> this part's token ids and loss masks (packed
    within the batch with `packing`)."""
    df = _part(df, part, fraction, ())
    split, _ = encode_pairs(_tokenizer(model_ref), df["a"].tolist(), df["b"].tolist(),
                            template, max_length, packing=packing)
    return encoded_table(split)


# ---- the workers' side -------------------------------------------------------------
def _streamed_splits_class():
    from ray.train import DataConfig

    class StreamedSplitsConfig(DataConfig):
        """The training stream in equal shares (every rank runs the same number of
        steps), the eval stream in shares of any size (every row evaluated once)."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids,
                      **kwargs):
            output: list[dict[str, Any]] = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = DataConfig.default_ingest_options()
                for i, split in enumerate(ds.streaming_split(
                        world_size, equal=name == "train", locality_hints=worker_node_ids)):
                    output[i][name] = split
            return output

    return StreamedSplitsConfig


def StreamedSplits():  # noqa: N802 (a class made when Ray Train is imported)
    """A ray.train.DataConfig for the "train" and "eval" streams."""
    return _streamed_splits_class()()


@dataclass(frozen=True)
class StreamedData:
    """What the workers of a streamed run get instead of the tokenised splits: the
    row counts (the Datasets themselves go to the trainer)."""

    train_rows: int
    eval_rows: int

    def open(self, task, cfg, rank: int, world: int) -> "StreamBatches":
        import ray.train

        return StreamBatches(self, task, cfg, rank, world,
                             ray.train.get_dataset_shard("train"),
                             ray.train.get_dataset_shard("eval"))


def table_items(table) -> list[tuple]:
    """A tokenised Arrow batch as Task.dataset items: (ids, label) or (ids, loss mask
    [, positions])."""
    def lists(name, dtype):
        col = table.column(name).combine_chunks()
        offsets = col.offsets.to_numpy()
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
        offsets = offsets - offsets[0]
        return [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]

    ids = lists("input_ids", np.int32)
    if "loss_mask" not in table.column_names:
        labels = table.column("label").to_numpy()
        return [(x, int(lab)) for x, lab in zip(ids, labels)]
    masks = lists("loss_mask", np.bool_)
    if "positions" in table.column_names:
        return list(zip(ids, masks, lists("positions", np.int32)))
    return list(zip(ids, masks))


class StreamBatches:
    """One worker's micro-batches from its share of the training stream, and its eval
    chunks from its share of the eval stream."""

    def __init__(self, meta: StreamedData, task, cfg, rank: int, world: int, train, evald):
        """`train`, `evald`: this rank's shards (ray.data.DataIterator)."""
        self.task, self.cfg, self.rank, self.world = task, cfg, rank, world
        self.train_rows, self.eval_rows = meta.train_rows, meta.eval_rows
        self.train, self.eval = train, evald
        self.filler: Optional[list] = None
        """One training example, which a rank whose eval share ran out runs."""
        self.micro = cfg.micro_batch_size
        self.micro_per_epoch = math.ceil(self.train_rows / (self.micro * world))

    def _local(self, epoch: int) -> Iterator[list[tuple]]:
        """This rank's micro-batches of the epoch, grouped by length."""
        cfg = self.cfg
        group = cfg.optim.group_by_length
        window = self.micro * (GROUP_BATCHES if group else 1)
        seed = [cfg.optim.seed % 2**63, epoch, self.rank]
        batches = self.train.iter_batches(
            batch_size=window, batch_format="pyarrow", prefetch_batches=2,
            local_shuffle_buffer_size=max(window, SHUFFLE_ROWS),
            local_shuffle_seed=int(np.random.default_rng(seed).integers(2**31)))
        for n, table in enumerate(batches):
            items = table_items(table)
            if group:
                items.sort(key=lambda it: len(it[0]))  # stable
            cut = [items[k:k + self.micro] for k in range(0, len(items), self.micro)]
            full = [b for b in cut if len(b) == self.micro]
            rest = [b for b in cut if len(b) < self.micro]
            if group:
                order = np.random.default_rng(seed + [n]).permutation(len(full))
                full = [full[i] for i in order]
            yield from full + rest

    def micro_batches(self, epoch: int, start: int,
                      reduce: Callable[[list[float]], Any]) -> Iterator[Micro]:
        """micro_per_epoch micro-batches on every rank (a rank whose share ran out runs
        one example with a factor of 0, as sharding.share_and_scale does), from the
        `start`-th on: a resumed epoch skips that many of the stream's micro-batches."""
        accum = self.cfg.optim.grad_accum_steps
        stream = self._local(epoch)
        last: Optional[list] = None
        for first in range(0, self.micro_per_epoch, accum):
            group = [next(stream, None) for _ in range(min(accum, self.micro_per_epoch - first))]
            last = next((g for g in reversed(group) if g), last)
            if last and self.filler is None:
                self.filler = last[:1]
            if first < start:
                continue
            mine = [g for g in group if g]
            local = [self.task.items_denominator([x for g in mine for x in g]),
                     float(sum(len(g) for g in mine)),
                     float(sum(len(x[0]) for g in mine for x in g))]
            denominator, samples, tokens = (float(v) for v in reduce(local))
            scale = self.world / max(denominator, 1e-12)
            for k, items in enumerate(group):
                counted = (int(samples), int(tokens)) if k == 0 else (0, 0)
                if items:
                    yield Micro(first + k, items, scale, *counted)
                else:
                    yield Micro(first + k, (last or [])[:1], 0.0, *counted)

    def _eval_local(self, batch_size: int) -> Iterator[list[tuple]]:
        for table in self.eval.iter_batches(batch_size=batch_size * GROUP_BATCHES,
                                            batch_format="pyarrow", prefetch_batches=2):
            items = sorted(table_items(table), key=lambda it: len(it[0]))
            for k in range(0, len(items), batch_size):
                yield items[k:k + batch_size]

    def eval_chunks(self, batch_size: int,
                    reduce: Callable[[list[float]], Any]) -> Iterator[tuple[list, bool]]:
        """This rank's batches of its share of the eval stream as (items, counted).
        The shares differ in size, and an FSDP forward gathers weights from every rank:
        the ranks go batch by batch together (one all-reduce of "mine has more" each)
        until every share is done, a rank whose share ran out running one training
        example, not counted."""
        stream = self._eval_local(batch_size)
        while True:
            chunk = next(stream, None)
            if float(reduce([0.0 if chunk is None else 1.0])[0]) == 0.0:
                return
            yield (chunk, True) if chunk is not None else (self.filler, False)
