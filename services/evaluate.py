"""`tuneserve eval`: a classifier's metrics on a labelled data file.

    tuneserve eval --data dev.csv --model sentiment[@v2] [--registry DIR]   # local
    tuneserve eval --data dev.csv --model sentiment --address HOST:PORT     # live gRPC API

Locally, the version (the production channel's when none is named) is verified, loaded
and smoke-tested by the model runtime a serving replica runs (services/runtime/classifier.py)
and run in batches sorted by length. Through `--address` the texts go to the live
Classify API in requests of at most the server's limit, all pinned to one version.
Either way the data's labels are matched to the model's by name, as training does it
(0/1 in a data file are the labels "0"/"1"), and the metrics come from
services/core/evaluation.py, the code training reports with, so the numbers compare.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import grpc

from services.client import Client, check_address, token_from
from services.core.config import CLASSIFICATION, DEFAULT_REGISTRY, ServeLimits
from services.core.data import LabelledData, LabelSet, load_labelled
from services.core.errors import DataError, InvalidInput, ModelNotFound, TuneserveError
from services.core.evaluation import (
    confusion_matrix,
    format_report,
    metrics_from_confusion,
    summary,
    write_confusion_png,
)
from services.core.registry import Registry, validate_name, validate_version
from services.runtime.classifier import load_classifier, predict

DEFAULT_LOCAL_BATCH = 64
TOKEN_ENV = "TUNESERVE_API_TOKEN"
_LIMIT_RE = re.compile(r"the limit is (\d+) per request")
_TEXT_FIELD_RE = re.compile(r"texts\[(\d+)\]")


@dataclass
class EvalReport:
    model: str
    version: str
    source: str
    """"registry" (loaded locally) or "grpc" (through a live server)."""
    location: str
    """The registry root or the server's HOST:PORT."""
    data: dict[str, Any]
    labels: list[str]
    confusion_matrix: list[list[int]]
    metrics: dict[str, Any]
    """metrics_from_confusion's result: scalars and per_class."""
    inference_s: float

    def to_json(self) -> dict[str, Any]:
        n = self.metrics["support"]
        return {"model": self.model, "version": self.version, "source": self.source,
                "location": self.location, "data": self.data, "examples": n,
                "labels": self.labels, "metrics": summary(self.metrics),
                "per_class": self.metrics["per_class"],
                "confusion_matrix": self.confusion_matrix,
                "inference_s": round(self.inference_s, 3),
                "examples_per_s": round(n / self.inference_s, 1) if self.inference_s else None}

    def format(self) -> str:
        where = "registry" if self.source == "registry" else "server"
        return (f"{self.model} {self.version} ({where} {self.location}) on "
                f"{self.data['path']}: {self.metrics['support']} examples, "
                f"{self.inference_s:.1f}s\n\n"
                + format_report(self.metrics, self.confusion_matrix, self.labels))

    def write_png(self, path: str | Path) -> Path:
        try:
            return write_confusion_png(self.confusion_matrix, self.labels, path,
                                       title=f"{self.model} {self.version} on "
                                             f"{Path(self.data['path']).name}")
        except OSError as exc:
            raise InvalidInput(f"--confusion-png: cannot write {path}: "
                               f"{exc.strerror or exc}") from None


# ---- inputs ------------------------------------------------------------------------
def parse_model_ref(ref: str) -> tuple[str, Optional[str]]:
    """NAME or NAME@VERSION -> (name, version or None), both checked."""
    name, at, version = ref.partition("@")
    try:
        validate_name(name)
        if at:
            validate_version(version)
    except InvalidInput as exc:
        raise InvalidInput(f"--model: {exc} (expected NAME or NAME@VERSION)") from None
    return name, (version if at else None)


def read_data(path: str, text_column: Optional[str] = None,
              label_column: Optional[str] = None, columns: Optional[str | Sequence[str]] = None,
              limit: Optional[int] = None) -> LabelledData:
    """The labelled examples, read as `tuneserve train` reads them; the first `limit`."""
    if limit is not None and limit < 1:
        raise InvalidInput(f"--limit: must be at least 1, got {limit}")
    if isinstance(columns, str):
        columns = [c.strip() for c in columns.split(",")]
    if columns is not None and (not columns or any(not c for c in columns)):
        raise InvalidInput("--columns: must be a comma-separated list of column names")
    data = load_labelled(path, text_column, label_column, columns)
    if limit is not None:
        data.texts, data.labels = data.texts[:limit], data.labels[:limit]
    return data


def label_ids(data: LabelledData, model_labels: Sequence[str], model: str) -> list[int]:
    """The data's labels as the model's label ids, matched by name; every label the
    model does not know is named in one error."""
    labelset = LabelSet(list(model_labels))
    unknown: dict[str, list[int]] = {}
    for i, lab in enumerate(data.labels):
        if str(lab) not in labelset.index:
            unknown.setdefault(str(lab), []).append(i + 1)
    if unknown:
        shown = ", ".join(f"{lab!r} ({len(rows)} example{'s' * (len(rows) > 1)}, first "
                          f"#{rows[0]})" for lab, rows in list(unknown.items())[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        plural = "s" * (len(unknown) > 1)
        raise DataError(f"{data.path}: label column '{data.label_column}': label{plural} "
                        f"{shown}{more} unknown to model {model} (its labels: "
                        f"{', '.join(labelset.names)})")
    return labelset.encode(data.labels)


def _data_info(data: LabelledData) -> dict[str, Any]:
    return {"path": data.path, "sha256": data.sha256, "rows": len(data.texts),
            "text_column": data.text_column, "label_column": data.label_column}


def _check_task(task: str, model: str) -> None:
    if task and task != CLASSIFICATION:
        raise InvalidInput(f"--model: {model} is a {task} model; tuneserve eval "
                           "evaluates classification models only")


def _bar(total: int, enabled: Optional[bool]):
    """A tqdm bar on a terminal (stderr), else a no-op with the same methods."""
    from tqdm import tqdm

    enabled = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(total=total, unit="text", dynamic_ncols=True, leave=False,
                disable=not enabled, file=sys.stderr)


def _report(name: str, version: str, source: str, location: str, data: LabelledData,
            labels: list[str], true: list[int], pred: list[int], inference_s: float) -> EvalReport:
    cm = confusion_matrix(true, pred, len(labels))
    return EvalReport(name, version, source, location, _data_info(data), list(labels), cm,
                      metrics_from_confusion(cm, labels), inference_s)


# ---- local: from the registry --------------------------------------------------------
def evaluate_local(registry: str, name: str, version: Optional[str], data: LabelledData,
                   batch_size: int = DEFAULT_LOCAL_BATCH,
                   progress: Optional[bool] = None,
                   optimize: Optional[str] = None) -> EvalReport:
    reg = Registry(registry)
    if not reg.backend.remote and not Path(reg.backend.root).is_dir():
        raise InvalidInput(f"--registry: no registry at {registry}")
    try:
        if version is None:
            if not reg.exists(name):
                raise ModelNotFound(f"model '{name}' not found in the registry")
            version = reg.channel(name, "production")
            if version is None:
                raise ModelNotFound(f"model '{name}' has no production version; "
                                    f"name one: --model {name}@VERSION")
        manifest = reg.manifest(name, version)
    except ModelNotFound as exc:
        raise InvalidInput(f"--model: {exc} ({reg.uri.split('?')[0]})") from None
    _check_task(manifest.get("task"), f"{name} {version}")
    labels = list(manifest.get("labels") or [])
    true = label_ids(data, labels, f"{name} {version}")
    # verified, labels checked, smoke-tested; on ONNX Runtime where `optimize` says so
    loaded = load_classifier(reg, name, version, optimize=optimize)

    texts = data.texts
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    pred = [0] * len(texts)
    started = time.perf_counter()
    with _bar(len(texts), progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            probs = predict(loaded, [texts[i] for i in idx], chunk=batch_size)
            for i, p in zip(idx, probs.argmax(dim=-1).tolist()):
                pred[i] = p
            bar.update(len(idx))
    return _report(name, version, "registry", reg.uri.split("?")[0], data, labels, true,
                   pred, time.perf_counter() - started)


def _check_registry_task(registry: str, name: str, version: Optional[str]) -> None:
    """The model's task, when its manifest can be read now (else evaluate_local says
    what is wrong, after the data)."""
    reg = Registry(registry)
    try:
        version = version or reg.channel(name, "production")
        task = reg.task(name, version) if version else None
    except TuneserveError:
        return
    if task is not None:
        _check_task(task, f"{name} {version}")


# ---- remote: through the live gRPC API ----------------------------------------------
def _rpc_error(exc, address: str, first_call: bool = False) -> TuneserveError:
    """A one-line error for a failed call; the caller's mistakes exit 2."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE or (first_call and
                                              code == grpc.StatusCode.DEADLINE_EXCEEDED):
        return InvalidInput(f"--address {address}: server unreachable or not ready "
                            f"({code.name}: {' '.join(details.split())[:200]})")
    if code == grpc.StatusCode.NOT_FOUND:
        return InvalidInput(f"--model: {details}")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return InvalidInput(f"--address {address}: {code.name}: {details} "
                            f"(the token comes from --token-file or ${TOKEN_ENV})")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        return InvalidInput(f"--address {address}: {code.name}: {details}")
    return TuneserveError(f"--address {address}: {code.name}: {details}")


def _classify_error(exc, address: str, data: LabelledData, idx: list[int]) -> TuneserveError:
    """A failed Classify call's error; a text the server refused (its BadRequest field,
    `texts[i]`) is named by its example."""
    for violation in getattr(exc, "field_violations", ()):
        field = _TEXT_FIELD_RE.fullmatch(violation.field)
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and field \
                and int(field.group(1)) < len(idx):
            return InvalidInput(f"{data.path}: example #{idx[int(field.group(1))] + 1}: "
                                f"refused by the server: {violation.description}")
    return _rpc_error(exc, address)


def _lower_limit(exc, sent: int) -> Optional[int]:
    """The server's limit on texts per request, where it refused `sent` texts for it."""
    lower = _LIMIT_RE.search(exc.details() or "")
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and lower \
            and 0 < int(lower.group(1)) < sent:
        return int(lower.group(1))
    return None


def _served_labels(resp, info) -> list[str]:
    """The model's labels in id order, from its first answer and its ListModels entry."""
    names = [s.label for s in resp.results[0].scores]
    served = list(info[0].labels) if info else []
    # ListModels lists labels in id order; else order them as training does.
    return served if sorted(served) == sorted(names) else LabelSet.from_labels(names).names


def evaluate_remote(client, name: str, version: Optional[str], data: LabelledData,
                    batch_size: Optional[int] = None,
                    progress: Optional[bool] = None) -> EvalReport:
    """Through a server's Classify API (`client`: a services.client.Client).

    Requests hold at most `batch_size` texts (default: the server's limit); when the
    server answers that its limit is lower, they shrink to it. After the first request
    every one names the version that answered it, so a promote during the evaluation
    changes nothing."""
    address = client.address
    try:
        info = client.list_models(name).models
    except grpc.RpcError as exc:
        raise _rpc_error(exc, address, first_call=True) from None
    if info:
        _check_task(info[0].task, name)
        version = version or info[0].production_version or None
    per_request = batch_size or ServeLimits().max_texts_per_request
    texts = data.texts
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers: list[str] = [""] * len(texts)
    labels: list[str] = []
    true: list[int] = []
    started = time.perf_counter()
    with _bar(len(texts), progress) as bar:
        pos = 0
        while pos < len(order):
            # The first request is one text: it tells the version and the labels, so a
            # label the model does not know fails before the bulk of the work.
            idx = order[pos:pos + (per_request if labels else 1)]
            try:
                resp = client.classify(name, [texts[i] for i in idx], version=version or "")
            except grpc.RpcError as exc:
                lower = _lower_limit(exc, len(idx))
                if lower is None:
                    raise _classify_error(exc, address, data, idx) from None
                per_request = lower
                continue
            if not labels:
                version = resp.version
                labels = _served_labels(resp, info)
                true = label_ids(data, labels, f"{name} {version}")
            for i, result in zip(idx, resp.results):
                answers[i] = result.label
            bar.update(len(idx))
            pos += len(idx)
    index = {lab: i for i, lab in enumerate(labels)}
    pred = [index[a] for a in answers]
    return _report(name, version or "", "grpc", address, data, labels, true, pred,
                   time.perf_counter() - started)


# ---- the command -----------------------------------------------------------------------
def run_eval(*, data: str, model: str, registry: Optional[str] = None,
             address: Optional[str] = None, text_column: Optional[str] = None,
             label_column: Optional[str] = None, columns: Optional[str] = None,
             batch_size: Optional[int] = None, limit: Optional[int] = None,
             timeout_s: float = 60.0, token_file: Optional[str] = None,
             progress: Optional[bool] = None,
             tls: Optional[dict] = None, optimize: Optional[str] = None) -> EvalReport:
    """What `tuneserve eval` does, short of printing. With `address`, the API token
    comes from `token_file`, else from the environment as Client reads it; `tls`: the
    Client's TLS keyword arguments (tls, tls_ca, tls_cert, tls_key); `optimize`: run
    the registry's version as `tuneserve serve --optimize` would."""
    if batch_size is not None and batch_size < 1:
        raise InvalidInput(f"--batch-size: must be at least 1, got {batch_size}")
    if not timeout_s > 0:
        raise InvalidInput(f"--timeout-s: must be > 0, got {timeout_s}")
    if token_file and not address:
        raise InvalidInput("--token-file: a token is for a server; pass --address too (a "
                           "registry on disk needs none)")
    if optimize and address:
        raise InvalidInput("--optimize: the server chooses its runtime (tuneserve serve "
                           "--optimize); pass --registry instead of --address")
    name, version = parse_model_ref(model)
    if address:  # a bad address is refused before the data is read
        check_address(address)
    else:  # so is a generation model
        _check_registry_task(registry or DEFAULT_REGISTRY, name, version)
    examples = read_data(data, text_column, label_column, columns, limit)
    if address:
        token = token_from(token_file, TOKEN_ENV) if token_file else None
        with Client(address, token=token, timeout_s=timeout_s, **(tls or {})) as client:
            return evaluate_remote(client, name, version, examples, batch_size, progress)
    return evaluate_local(registry or DEFAULT_REGISTRY, name, version, examples,
                          batch_size or DEFAULT_LOCAL_BATCH, progress, optimize)
