"""Reading labelled data sets: CSV, TSV, JSONL and Parquet, local paths or s3:// URIs.

`load_labelled(path, ...)` returns texts and raw labels (classification);
`load_pairs(path, ...)` returns prompt/response pairs (generation); `LabelSet` maps raw labels
(ints or strings) to contiguous ids and back, and is stored in the checkpoint as
`id2label`. Every error names the file and, for text formats, the line.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from services.core import objectstore
from services.core.errors import DataError

TEXT_COLUMN_CANDIDATES = ("text", "sentence", "content", "review", "document")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "category", "class", "target")
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
           ".parquet": "parquet", ".pq": "parquet"}

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def local_file(path: str | Path) -> Path:
    """The file to read: the path itself, or a local copy of an s3:// object."""
    return objectstore.fetch(str(path)) if objectstore.is_remote(path) else Path(path)


def _source(given: str, path: Path) -> str:
    """Where the data came from, as recorded: the URI (no query) or the local path."""
    return objectstore.shown(given) if objectstore.is_remote(given) else str(path)


def detect_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: unsupported file type '{path.suffix or '(none)'}'; "
            f"use one of {', '.join(sorted(FORMATS))}"
        )
    return fmt


@dataclass
class Row:
    """One record and where it came from (line number for text formats, else row)."""

    values: dict[str, Any]
    where: str


def iter_rows(path: str | Path, columns: Optional[Sequence[str]] = None) -> Iterator[Row]:
    """Yield rows as dicts. `columns` names the fields of a headerless CSV/TSV."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; pass a data file (.csv, .tsv, .jsonl, .json "
                        "or .parquet)")
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file; pass a data file (.csv, .tsv, "
                        ".jsonl, .json or .parquet)")
    fmt = detect_format(path)
    if fmt in ("csv", "tsv"):
        yield from _iter_delimited(path, fmt, columns)
    elif fmt == "jsonl" and _starts_with(path, "["):
        yield from _iter_json_array(path)
    elif fmt == "jsonl":
        yield from _iter_jsonl(path)
    else:
        yield from _iter_parquet(path)


def _tsv_quoting(path: Path) -> int:
    """How to read a TSV file's quotes. GLUE-style TSV is not quoted: a quote is just a
    character. pandas' to_csv(sep="\\t") and csv.writer quote a field holding a tab, a
    newline or a quote (a quote inside is doubled). A file is read as quoted when a field starts
    with a quote and the whole file parses as strict quoted TSV with one field count on
    every row; otherwise as unquoted (an unquoted text that merely starts with a quote
    fails that test, so it keeps its quote)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            if not any(line.startswith('"') or '\t"' in line for line in fh):
                return csv.QUOTE_NONE
        with path.open(newline="", encoding="utf-8-sig") as fh:
            widths = {len(r) for r in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_MINIMAL,
                                                 strict=True)
                      if r and not (len(r) == 1 and not r[0].strip())}
    except (csv.Error, UnicodeDecodeError):  # (a decoding error is reported by the read)
        return csv.QUOTE_NONE
    return csv.QUOTE_MINIMAL if len(widths) == 1 else csv.QUOTE_NONE


def _iter_delimited(path: Path, fmt: str, columns: Optional[Sequence[str]]) -> Iterator[Row]:
    quoting = _tsv_quoting(path) if fmt == "tsv" else csv.QUOTE_MINIMAL
    delimiter = "\t" if fmt == "tsv" else ","
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
            header: Optional[list[str]] = list(columns) if columns else None
            first = True
            for record in reader:
                line = reader.line_num
                if first and columns and [v.strip() for v in record] == list(columns):
                    first = False
                    continue  # a header naming the columns as --columns does
                first = False
                if header is None:
                    header = [h.strip() for h in record]
                    if not any(header):
                        raise DataError(f"{path}:{line}: empty header row")
                    twice = sorted({h for h in header if h and header.count(h) > 1})
                    if twice:
                        raise DataError(f"{path}:{line}: the header names a column twice: "
                                        f"{_names(twice)}")
                    continue
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue  # blank line
                if len(record) != len(header):
                    raise DataError(
                        f"{path}:{line}: expected {len(header)} fields "
                        f"({', '.join(header)}), found {len(record)}"
                        + ("" if columns else "; headerless file? pass --columns text,label")
                    )
                yield Row(dict(zip(header, record)), f"{path}:{line}")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed {fmt.upper()}: {exc}") from None


def _iter_jsonl(path: Path) -> Iterator[Row]:
    try:
        with path.open(encoding="utf-8-sig") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    hint = "; JSON Lines holds each object on one line" \
                        if line.strip() == "{" else ""
                    raise DataError(_json_shape(path) or
                                    f"{path}:{line_no}: invalid JSON: {exc.msg}{hint}") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{line_no}: expected a JSON object per line")
                yield Row(obj, f"{path}:{line_no}")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _json_shape(path: Path) -> Optional[str]:
    """Why a file of valid JSON that is not JSON Lines was refused, or None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError, OSError):
        return None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        where = f" (its records may be the list under {_names(lists[:3])!s})" if lists else ""
        return (f"{path}: one JSON object{where}; expected an array of records "
                "([{...}, {...}]) or one object per line (JSON Lines)")
    return f"{path}: valid JSON, but a {type(data).__name__}; expected an array of records " \
           "or one object per line (JSON Lines)"


def _starts_with(path: Path, char: str) -> bool:
    """Whether the file's first character other than whitespace (or a BOM) is `char`."""
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1] == char.encode()


def _iter_json_array(path: Path) -> Iterator[Row]:
    """A .json file holding one array of objects (what json.dump of a list writes)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects or one object per line")
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DataError(f"{path}: item {i + 1} of the array is not a JSON object")
        yield Row(obj, f"{path}: item {i + 1}")


def _iter_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    for i, obj in enumerate(table.to_pylist()):
        yield Row(obj, f"{path}: row {i + 1}")


def pick_column(path: Path, available: Sequence[str], wanted: Optional[str],
                 candidates: Sequence[str], what: str, headerless: Optional[str] = None,
                 taken: Optional[str] = None) -> str:
    """`headerless`: for a CSV/TSV read without --columns, the --columns value that would
    name its fields (e.g. "text,label"), offered when no column name is recognised.
    `taken`: the column already picked for the other role, never guessed for this one."""
    if wanted:
        if wanted not in available:
            raise DataError(
                f"{path}: no {what} column '{wanted}'; columns are: {_names(available)}"
            )
        return wanted
    for name in candidates:
        if name in available and name != taken:
            return name
    hint = f"pass --{what}-column"
    if headerless:
        hint = (f"if its first row is data, not a header, pass --columns {headerless} "
                f"(the fields in order); else {hint}")
    other = "text" if what == "label" else "label"
    clash = (f" ('{taken}' is the {other} column)"
             if taken is not None and taken in candidates and taken in available else "")
    raise DataError(
        f"{path}: cannot tell which column holds the {what}{clash}; columns are: "
        f"{_names(available)}; {hint}"
    )


def _names(columns: Sequence[str], width: int = 40) -> str:
    """Column names for a message; a headerless file's first row can be long text."""
    return ", ".join(c if len(c) <= width else c[:width - 3] + "..." for c in map(str, columns))


def pick_columns(where, available: Sequence[str],
                 first: tuple[str, Optional[str], Sequence[str]],
                 second: tuple[str, Optional[str], Sequence[str]],
                 headerless: bool) -> tuple[str, str]:
    """The columns of a record's two roles (text and label, prompt and response), each
    given as (role, the column the config names or None, the names guessed otherwise);
    the second is never guessed as the first. `headerless`: a CSV/TSV read without
    --columns, whose first row may be data (the error then offers --columns)."""
    (role1, wanted1, candidates1), (role2, wanted2, candidates2) = first, second
    hint = f"{role1},{role2}" if headerless else None
    col1 = pick_column(where, available, wanted1, candidates1, role1, hint)
    return col1, pick_column(where, available, wanted2, candidates2, role2, hint, taken=col1)


def _headerless(path: Path, columns: Optional[Sequence[str]]) -> bool:
    return columns is None and detect_format(path) in ("csv", "tsv")


@dataclass
class LabelledData:
    texts: list[str]
    labels: list[Any]
    text_column: str
    label_column: str
    path: str
    sha256: str


def load_labelled(path: str | Path, text_column: Optional[str] = None,
                  label_column: Optional[str] = None,
                  columns: Optional[Sequence[str]] = None) -> LabelledData:
    """Read (text, label) pairs; empty texts and missing labels are errors with a line."""
    source = str(path)
    path = local_file(path)
    texts: list[str] = []
    labels: list[Any] = []
    tcol = lcol = None
    for row in iter_rows(path, columns):
        if tcol is None:
            tcol, lcol = pick_columns(path, list(row.values),
                                      ("text", text_column, TEXT_COLUMN_CANDIDATES),
                                      ("label", label_column, LABEL_COLUMN_CANDIDATES),
                                      _headerless(path, columns))
        text = row.values.get(tcol)
        label = row.values.get(lcol)
        if not isinstance(text, str):
            if text is None:
                raise DataError(f"{row.where}: missing text in column '{tcol}'")
            raise DataError(f"{row.where}: text in column '{tcol}' is not a string: {text!r}")
        if not text.strip():
            raise DataError(f"{row.where}: empty text in column '{tcol}'")
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{row.where}: missing label in column '{lcol}'")
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            raise DataError(f"{row.where}: label must be a string or an integer, got {label!r}")
        texts.append(text)
        labels.append(label.strip() if isinstance(label, str) else label)
    if not texts:
        raise DataError(f"{path}: no examples found")
    if columns:
        _check_not_a_header(path, texts[0], labels, list(columns))
    return LabelledData(texts, _whole_numbers(labels), tcol, lcol, _source(source, path),
                        file_sha256(path))


_COLUMN_WORDS = {w for w in TEXT_COLUMN_CANDIDATES + LABEL_COLUMN_CANDIDATES}


def _check_not_a_header(path: Path, text: str, labels: list[Any], columns: list[str]) -> None:
    """With --columns a first row that differs from it is data. One that reads like a
    header (a column word as its text or label, and a label found nowhere else) would
    train as an example of a class of its own: refused."""
    label = labels[0]
    if not isinstance(label, str) or labels.count(label) > 1:
        return
    if text.strip().lower() in _COLUMN_WORDS or label.strip().lower() in _COLUMN_WORDS:
        raise DataError(
            f"{path}: its first row ({_names([text, label])}) looks like a header, read as "
            f"data because --columns {','.join(columns)} does not match it; drop --columns "
            "and name the header's columns with --text-column / --label-column")


_WHOLE_FLOAT = re.compile(r"^-?\d+\.0+\Z")


def _whole_numbers(labels: list[Any]) -> list[Any]:
    """Labels written as whole floats in text ("1.0", as pandas writes an integer column
    that held a NaN) read as the integers they are, as 1.0 in JSON or Parquet does; only
    when every text label of the file has that form."""
    texts = [v for v in labels if isinstance(v, str)]
    if not texts or not all(_WHOLE_FLOAT.match(v) for v in texts):
        return labels
    return [int(float(v)) if isinstance(v, str) else v for v in labels]


PROMPT_COLUMN_CANDIDATES = ("prompt", "question", "instruction", "input", "query")
ALPACA_INPUT = "input"
"""Beside an `instruction` column (found, not named), joined to the prompt when not
empty: Alpaca's instruction/input/output records."""
RESPONSE_COLUMN_CANDIDATES = ("response", "answer", "output", "completion", "target")


@dataclass
class PairData:
    """Prompt/response pairs for supervised fine-tuning of a causal LM."""

    prompts: list[str]
    responses: list[str]
    prompt_column: str
    response_column: str
    path: str
    sha256: str


def alpaca_input(prompt_column: Optional[str], pcol: str, rcol: str,
                 available: Sequence[str]) -> Optional[str]:
    """Alpaca-style records (a prompt column guessed as 'instruction'): the column of
    the instruction's input (often empty), part of the prompt after a blank line; or
    None."""
    return ALPACA_INPUT if (prompt_column is None and pcol == "instruction"
                            and ALPACA_INPUT in available and rcol != ALPACA_INPUT) else None


def load_pairs(path: str | Path, prompt_column: Optional[str] = None,
               response_column: Optional[str] = None,
               columns: Optional[Sequence[str]] = None) -> PairData:
    """Read (prompt, response) pairs; an empty prompt or response is an error with a line."""
    source = str(path)
    path = local_file(path)
    prompts: list[str] = []
    responses: list[str] = []
    pcol = rcol = extra = None
    for row in iter_rows(path, columns):
        if pcol is None:
            keys = list(row.values)
            pcol, rcol = pick_columns(path, keys,
                                      ("prompt", prompt_column, PROMPT_COLUMN_CANDIDATES),
                                      ("response", response_column,
                                       RESPONSE_COLUMN_CANDIDATES),
                                      _headerless(path, columns))
            if pcol == rcol:
                raise DataError(f"{path}: prompt and response are the same column '{pcol}'")
            extra = alpaca_input(prompt_column, pcol, rcol, keys)
        pair = []
        for col, what in ((pcol, "prompt"), (rcol, "response")):
            value = row.values.get(col)
            if value is None:
                raise DataError(f"{row.where}: missing {what} in column '{col}'")
            if not isinstance(value, str):
                raise DataError(f"{row.where}: {what} in column '{col}' is not a string: "
                                f"{str(value)[:60]!r}")
            if not value.strip():
                raise DataError(f"{row.where}: empty {what} in column '{col}'")
            pair.append(value)
        if extra is not None:
            more = row.values.get(extra)
            if more is not None and not isinstance(more, str):
                raise DataError(f"{row.where}: {extra} in column '{extra}' is not a string: "
                                f"{str(more)[:60]!r}")
            if more and more.strip():
                pair[0] = f"{pair[0]}\n\n{more}"
        prompts.append(pair[0])
        responses.append(pair[1])
    if not prompts:
        raise DataError(f"{path}: no examples found")
    if extra is not None:
        pcol = f"{pcol}+{extra}"
    return PairData(prompts, responses, pcol, rcol, _source(source, path), file_sha256(path))


MAX_LABELS_SHOWN = 20
"""Labels listed in a message at most."""


class LabelSet:
    """Raw labels <-> contiguous ids. Integer-like labels keep numeric order."""

    def __init__(self, names: Sequence[str]):
        if len(set(names)) != len(names):
            raise DataError(f"duplicate label names: {list(names)}")
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}

    @classmethod
    def from_labels(cls, labels: Sequence[Any], where: str = "") -> "LabelSet":
        uniq = {str(lab) for lab in labels}
        if len(uniq) < 2:
            raise DataError(
                f"{where}need at least 2 distinct labels to train a classifier, found "
                f"{_names(sorted(uniq))}"
            )
        if all(_is_int(u) for u in uniq):
            names = sorted(uniq, key=lambda s: int(s))
        else:
            names = sorted(uniq)
        return cls(names)

    def encode(self, labels: Sequence[Any], where: str = "") -> list[int]:
        out = []
        for lab in labels:
            key = str(lab)
            if key not in self.index:
                shown = self.names[:MAX_LABELS_SHOWN]
                more = len(self.names) - len(shown)
                known = _names(shown) + (f", ... ({more} more)" if more else "")
                hint = ""
                if len(self.names) > 100 or any(len(n) > 64 for n in self.names):
                    hint = (f"; {len(self.names)} distinct training labels, some long: are the "
                            "text and label columns swapped?")
                raise DataError(
                    f"{where}label {key if len(key) <= 40 else key[:37] + '...'!r} does not "
                    "occur in the training data "
                    f"(known labels: {known}){hint}"
                )
            out.append(self.index[key])
        return out

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    def __len__(self) -> int:
        return len(self.names)


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A deterministic shuffled split into (train, eval) indices; eval is never empty."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(n * eval_fraction)))
    if n - n_eval < 1:
        raise DataError(f"only {n} examples: too few to hold out an eval split")
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def stratified_split_indices(labels: Sequence[Any], eval_fraction: float,
                             seed: int) -> tuple[list[int], list[int]]:
    """Like split_indices, but each label keeps its share in both parts.

    A label with a single example stays in training (it cannot be in both).
    """
    by_label: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(str(lab), []).append(i)
    rng = random.Random(seed)
    train: list[int] = []
    evald: list[int] = []
    for key in sorted(by_label):
        members = by_label[key]
        rng.shuffle(members)
        n_eval = int(round(len(members) * eval_fraction)) if len(members) > 1 else 0
        n_eval = min(n_eval, len(members) - 1)
        evald.extend(members[:n_eval])
        train.extend(members[n_eval:])
    if not evald:
        return split_indices(len(labels), eval_fraction, seed)
    return sorted(train), sorted(evald)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
