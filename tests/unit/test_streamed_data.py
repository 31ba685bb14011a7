"""Streamed data without Ray: which files a data spec names, their identity, when a run
streams, and the per-batch functions Ray Data runs (row checks, the hash split,
tokenising to Arrow and back)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from services.core.data import file_sha256
from services.core.errors import DataError
from services.core.sources import identity, resolve
from services.training import streamed
from services.training.encoded import encode_texts


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    return path


def test_a_folder_of_shards_a_glob_and_one_file(tmp_path):
    a = _jsonl(tmp_path / "d" / "part-0.jsonl", [("a", "x")])
    b = _jsonl(tmp_path / "d" / "sub" / "part-1.jsonl", [("b", "y")])
    (tmp_path / "d" / "_SUCCESS").write_text("")
    (tmp_path / "d" / ".part-2.jsonl.crc").write_text("")
    folder = resolve(str(tmp_path / "d"))
    assert folder.paths == (str(a), str(b)) and folder.many and folder.fmt == "jsonl"
    glob = resolve(str(tmp_path / "d" / "**" / "part-*.jsonl"))
    assert glob.paths == (str(a), str(b)) and glob.many
    one = resolve(str(a))
    assert one.paths == (str(a),) and not one.many and one.total_bytes == a.stat().st_size


def test_bad_specs_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        resolve(str(tmp_path / "none.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files there"):
        resolve(str(tmp_path / "empty"))
    _jsonl(tmp_path / "mixed" / "a.jsonl", [("a", "x")])
    (tmp_path / "mixed" / "b.csv").write_text("text,label\nb,y\n")
    with pytest.raises(DataError, match=r"several formats \(csv, jsonl\)"):
        resolve(str(tmp_path / "mixed"))


def test_identity_of_one_file_is_its_sha256_and_of_shards_their_listing(tmp_path):
    a = _jsonl(tmp_path / "d" / "a.jsonl", [("a", "x")])
    _jsonl(tmp_path / "d" / "b.jsonl", [("b", "y")])
    one = identity(resolve(str(a)))
    assert one["sha256"] == file_sha256(a) and one["files"][0]["sha256"] == file_sha256(a)
    before = identity(resolve(str(tmp_path / "d")))
    assert [f["path"] for f in before["files"]] == sorted(str(p) for p in
                                                          (tmp_path / "d").iterdir())
    assert before == identity(resolve(str(tmp_path / "d")))
    _jsonl(tmp_path / "d" / "b.jsonl", [("b", "z")])
    assert identity(resolve(str(tmp_path / "d")))["sha256"] != before["sha256"]


def test_auto_streams_folders_and_large_data_only(tmp_path, monkeypatch):
    small = resolve(str(_jsonl(tmp_path / "s.jsonl", [("a", "x")])))
    folder = resolve(str(tmp_path))
    assert streamed.decide("auto", [small])[0] is False
    assert streamed.decide("auto", [folder])[0] is True
    assert streamed.decide("on", [small])[0] is True
    assert streamed.decide("off", [small])[0] is False
    with pytest.raises(DataError, match="a folder or glob of files is read as a stream"):
        streamed.decide("off", [folder])
    monkeypatch.setattr(streamed, "STREAMING_MIN_BYTES", small.total_bytes)
    assert streamed.decide("auto", [small]) == (True, f"{small.total_bytes / 2**20:.1f} MiB, "
                                                      "at least 0 MiB")


def _rows(texts, labels, **kw):
    df = pd.DataFrame({"text": texts, "label": labels})
    return streamed.labelled_rows(df, text_column="text", label_column="label",
                                  columns=kw.get("columns"), seed=kw.get("seed", 7),
                                  where="data.jsonl")


def test_the_split_key_is_the_rows_own_whatever_its_batch_and_format():
    texts = [f"text {i}" for i in range(1000)]
    labels = [i % 3 for i in range(1000)]
    whole = _rows(texts, labels)
    halves = pd.concat([_rows(texts[:300], labels[:300]), _rows(texts[300:], labels[300:])])
    assert np.array_equal(whole["u"].to_numpy(), halves["u"].to_numpy())
    # the label 2 read from JSON (an int), a float column or text is the same row
    as_text = _rows(texts, [str(v) for v in labels])
    as_float = _rows(texts, [float(v) for v in labels])
    assert np.array_equal(whole["u"].to_numpy(), as_text["u"].to_numpy())
    assert np.array_equal(whole["u"].to_numpy(), as_float["u"].to_numpy())
    assert not np.array_equal(whole["u"].to_numpy(), _rows(texts, labels, seed=8)["u"])


def test_the_hash_split_holds_out_each_label_at_the_same_rate():
    n = 20_000
    df = _rows([f"row {i}" for i in range(n)], ["a" if i % 10 else "b" for i in range(n)])
    held = streamed.in_eval(df, 0.1, ())
    for label in ("a", "b"):
        share = held[df["label"].to_numpy() == label].mean()
        assert 0.08 < share < 0.12, (label, share)


def test_a_label_the_split_would_leave_without_training_rows_stays_in_training():
    df = _rows([f"row {i}" for i in range(400)], ["common"] * 399 + ["rare"])
    rare_held = df["u"].to_numpy()[-1]
    fraction = min(0.99, rare_held + 1e-9)  # the rare row falls in the held-out share
    summary = streamed.summarise(df, fraction=fraction, sample_below=0.0)
    counts: dict[str, list[int]] = {}
    for label, held, n in zip(summary["label"], summary["held"], summary["n"]):
        counts.setdefault(label, [0, 0])[1 if held else 0] += int(n)
    found = streamed.Scan(counts, [])
    assert found.keep() == ["rare"]
    assert not streamed.in_eval(df, fraction, found.keep())[-1]


def test_row_checks_name_the_column_and_source():
    with pytest.raises(DataError, match="data.jsonl: empty text in column 'text'"):
        _rows(["fine", "  "], ["a", "b"])
    with pytest.raises(DataError, match="data.jsonl: missing label in column 'label'"):
        _rows(["fine", "ok"], ["a", None])
    with pytest.raises(DataError, match="label must be a string or an integer, got 1.5"):
        _rows(["fine", "ok"], [1.0, 1.5])
    with pytest.raises(DataError, match="text in column 'text' is not a string: '3'"):
        _rows(["fine", 3], ["a", "b"])


def test_a_header_named_as_columns_is_dropped():
    df = pd.DataFrame({"text": ["text", "good"], "label": ["label", "pos"]})
    rows = streamed.labelled_rows(df, text_column="text", label_column="label",
                                  columns=("text", "label"), seed=1, where="d.tsv")
    assert rows["a"].tolist() == ["good"] and rows["label"].tolist() == ["pos"]


def test_tokenised_batches_cross_arrow_as_the_examples_they_are(tiny_model_dir):
    from services.core.modeling import load_tokenizer

    texts = ["a good film", "bad", "a lovely story with fine acting", "dull"]
    df = _rows(texts, ["pos", "neg", "pos", "neg"])
    table = streamed.tokenised_labelled(df, part="all", fraction=0.0, keep=[],
                                        label_ids={"neg": 0, "pos": 1},
                                        model_ref=str(tiny_model_dir), max_length=16,
                                        where="d")
    items = streamed.table_items(table)
    expected = encode_texts(load_tokenizer(str(tiny_model_dir)), texts, [1, 0, 1, 0], 16)
    assert [(x.tolist(), lab) for x, lab in items] == \
        [(expected.example(i).tolist(), int(expected.labels[i])) for i in range(4)]
    assert table.column("length").to_pylist() == expected.lengths().tolist()
    with pytest.raises(DataError, match="label 'pos' does not occur in the training data"):
        streamed.tokenised_labelled(df, part="all", fraction=0.0, keep=[],
                                    label_ids={"neg": 0}, model_ref=str(tiny_model_dir),
                                    max_length=16, where="d")


class _Shard:
    """A rank's shard of a stream, as Ray Train's DataIterator yields it."""

    def __init__(self, table):
        self.table = table

    def iter_batches(self, *, batch_size, batch_format, **_):
        assert batch_format == "pyarrow"
        for k in range(0, self.table.num_rows, batch_size):
            yield self.table.slice(k, batch_size)


def _stream(rows: int, world: int, group: bool, seed: int = 0):
    from types import SimpleNamespace

    from services.core.config import TrainConfig
    from services.training.encoded import EncodedSplit
    from services.training.tasks import make_task

    rng = np.random.default_rng(seed)
    tokens = [list(range(1, int(n) + 1)) for n in rng.integers(2, 60, rows)]
    table = streamed.encoded_table(EncodedSplit.from_lists(tokens, list(range(rows))))
    resolved = TrainConfig(model="m", train="t.csv", workers=world, batch_size=8 * world,
                           grad_accum_steps=2, group_by_length=group).resolve()
    cfg = SimpleNamespace(micro_batch_size=4, optim=resolved.optim)
    meta = streamed.StreamedData(train_rows=rows * world, eval_rows=0)
    return streamed.StreamBatches(meta, make_task(resolved), cfg, 0, world, _Shard(table),
                                  None)


def _padding(micros) -> int:
    return sum(max(len(x) for x, _ in m.items) * len(m.items) - sum(len(x) for x, _ in m.items)
               for m in micros if m.scale)


def test_a_stream_gives_every_rank_the_same_steps_and_groups_lengths():
    reduced = []

    def reduce(values):  # the other rank holds as much
        reduced.append(values)
        return [2 * v for v in values]

    batches = _stream(37, world=2, group=True)
    micros = list(batches.micro_batches(0, 0, reduce))
    assert batches.micro_per_epoch == 10  # ceil(74 / (4 x 2))
    assert [m.index for m in micros] == list(range(10))
    assert sorted(lab for m in micros for _, lab in m.items) == list(range(37))
    assert len(reduced) == 5  # one all-reduce per optimizer step (2 micro-batches)
    assert [m.scale for m in micros[:2]] == [2 / (2 * 8)] * 2  # world / group's examples
    assert sum(m.samples for m in micros) == 2 * 37
    plain = list(_stream(37, world=2, group=False).micro_batches(0, 0, reduce))
    assert _padding(micros) < _padding(plain) / 2


def test_a_resumed_stream_skips_the_trained_micro_batches_and_a_short_one_pads():
    def reduce(values):
        return values

    resumed = list(_stream(40, world=1, group=False).micro_batches(0, 4, reduce))
    assert [m.index for m in resumed] == list(range(4, 10))
    assert sorted(lab for m in resumed for _, lab in m.items) == list(range(16, 40))
    short = _stream(30, world=1, group=False)
    short.train_rows = 40  # the stream holds fewer rows than the steps were counted for
    short.micro_per_epoch = 10
    micros = list(short.micro_batches(0, 0, reduce))
    assert len(micros) == 10
    assert [(len(m.items), m.scale) for m in micros[8:]] == [(1, 0.0), (1, 0.0)]


def test_eval_shares_of_any_size_run_in_step_on_every_rank():
    batches = _stream(24, world=2, group=False)
    batches.eval = _Shard(batches.train.table.slice(0, 10))  # 10 rows: 3 batches of 4
    list(batches.micro_batches(0, 0, lambda values: values))  # training sets the filler
    others = iter([1.0] * 5 + [0.0])  # another rank has 5 batches

    def reduce(values):  # "has more" summed over this rank and the other
        return [values[0] + next(others)]

    chunks = list(batches.eval_chunks(4, reduce))
    assert [(len(items), counted) for items, counted in chunks] == \
        [(4, True), (4, True), (2, True), (1, False), (1, False)]
    assert sum(len(items) for items, counted in chunks if counted) == 10


def test_data_streaming_is_checked_with_the_other_fields():
    from services.core.config import TrainConfig
    from services.core.errors import ConfigError

    assert TrainConfig(model="m", train="t.csv").resolve().data.data_streaming == "auto"
    with pytest.raises(ConfigError, match="'data_streaming': must be one of auto, on, off"):
        TrainConfig(model="m", train="t.csv", data_streaming="sometimes").resolve()
    with pytest.raises(ConfigError, match="'data_streaming': --search trains on data in "
                                          "memory"):
        TrainConfig(model="m", train="t.csv", data_streaming="on", search=True).resolve()
