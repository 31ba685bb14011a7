"""Only safetensors weights are ever loaded, and only sound ones.

- a pickle (by name, or hidden under another name) is refused on publish and verify;
- the model loaders never fall back to torch.load, even when a pickle sits beside them;
- a hostile safetensors header is refused with a clear ValueError / CorruptVersion,
  reading no more than the file holds and allocating nothing it claims.

Tiny checkpoints only (a hidden-32 BERT built from a config, hand-made safetensors
files); no Ray, no download.
"""

import io
import json
import os
import pickle
import shutil
import struct
import time

import pytest

from services.core.data import file_sha256
from services.core.errors import CorruptVersion, RegistryError
from services.core.registry import Registry
from services.core.registry import safetensors_check
from services.core.registry.safetensors_check import MAX_HEADER_BYTES, check_safetensors

LABELS = ["neg", "pos"]


def classification_manifest():
    return {"task": "classification", "labels": list(LABELS)}


class RunsCode:
    """Unpickling this creates a directory: the proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def hostile_pickle(marker, protocol=2) -> bytes:
    return pickle.dumps(RunsCode(marker), protocol=protocol)


def torch_save_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture
def checkpoint(tiny_model_dir, tmp_path):
    """A fresh copy of the tiny BERT checkpoint (safetensors weights, tokenizer), with
    its labels in config.json as training writes them."""
    folder = shutil.copytree(tiny_model_dir, tmp_path / "ck")
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = dict(enumerate(LABELS))
    config["label2id"] = {label: i for i, label in enumerate(LABELS)}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def published(checkpoint, tmp_path):
    reg = Registry(tmp_path / "reg")
    assert reg.publish("m", checkpoint, classification_manifest()).version == "v1"
    assert reg.verify("m", "v1")
    return reg


def plant(reg: Registry, rel: str, data: bytes, name="m", version="v1"):
    """Write a file into a published version AND list it in the manifest with its true
    sha256 and size, as someone with write access to the registry could: the checks
    below must not depend on the checksums to refuse it."""
    folder = reg.local_copy(name, version)
    (folder / rel).write_bytes(data)
    mpath = folder / "manifest.json"
    body = json.loads(mpath.read_text())
    body["files"][rel] = {"sha256": file_sha256(folder / rel), "size": len(data)}
    mpath.write_text(json.dumps(body))


# ---- pickles -----------------------------------------------------------------------
@pytest.mark.parametrize("fname", ["pytorch_model.bin", "model.pt", "model.pth",
                                   "state.pkl", "last.ckpt", "OPTIM.PT"])
def test_pickle_file_names_are_refused_on_publish_and_verify(published, checkpoint, fname,
                                                            tmp_path):
    (checkpoint / fname).write_bytes(hostile_pickle(tmp_path / "ran"))
    with pytest.raises(RegistryError, match="pickle"):
        published.publish("m", checkpoint, classification_manifest())
    assert published.versions("m") == ["v1"]
    assert not list((tmp_path / "reg" / "m").glob(".staging-*"))

    plant(published, fname, hostile_pickle(tmp_path / "ran"))
    with pytest.raises(CorruptVersion, match="pickle"):
        published.verify("m", "v1")
    assert not (tmp_path / "ran").exists()


HIDDEN = {
    "pickle protocol 2": lambda m: hostile_pickle(m, 2),
    "pickle protocol 4": lambda m: hostile_pickle(m, 4),
    "pickle protocol 5": lambda m: hostile_pickle(m, 5),
    "torch.save zip": lambda m: torch_save_bytes({"w": [1, 2, 3]}),
    "numpy array": lambda m: b"\x93NUMPY\x01\x00v\x00{'descr': '|O', ...}",
}


@pytest.mark.parametrize("kind", list(HIDDEN))
@pytest.mark.parametrize("fname", ["extra_weights.dat", "special_tokens.json"])
def test_pickle_hidden_under_another_name_is_refused(published, checkpoint, kind, fname,
                                                     tmp_path):
    data = HIDDEN[kind](tmp_path / "ran")
    (checkpoint / fname).write_bytes(data)
    with pytest.raises(RegistryError, match="can run code"):
        published.publish("m", checkpoint, classification_manifest())
    assert published.versions("m") == ["v1"]

    plant(published, fname, data)
    with pytest.raises(CorruptVersion, match="can run code"):
        published.verify("m", "v1")
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("kind", ["pickle protocol 2", "torch.save zip"])
def test_pickle_named_safetensors_is_refused(published, kind, tmp_path):
    plant(published, "model.safetensors", HIDDEN[kind](tmp_path / "ran"))
    with pytest.raises(CorruptVersion, match="model.safetensors: not a safetensors file"):
        published.verify("m", "v1")


def test_index_and_config_may_only_name_own_safetensors(published, checkpoint):
    # a sharded index pointing at a pickle shard or out of the folder
    for shard in ["pytorch_model-00001.bin", "../../v0/model.safetensors", "/etc/passwd"]:
        index = {"metadata": {}, "weight_map": {"w": shard}}
        (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(RegistryError, match="not a safetensors file of this"):
            published.publish("m", checkpoint, classification_manifest())
    (checkpoint / "model.safetensors.index.json").unlink()
    plant(published, "model.safetensors.index.json",
          json.dumps({"weight_map": {"w": "../other/model.safetensors"}}).encode())
    with pytest.raises(CorruptVersion, match="not a safetensors file of this"):
        published.verify("m", "v1")

    # config.json's transformers_weights (read by transformers before use_safetensors)
    config = json.loads((checkpoint / "config.json").read_text())
    for ref in ["adapter_model.bin", "../x.safetensors"]:
        (checkpoint / "config.json").write_text(json.dumps({**config,
                                                            "transformers_weights": ref}))
        with pytest.raises(RegistryError, match="transformers_weights"):
            published.publish("m", checkpoint, classification_manifest())
    (checkpoint / "config.json").write_text(json.dumps(
        {**config, "transformers_weights": "model.safetensors"}))
    assert published.publish("m", checkpoint, classification_manifest()).version == "v2"
    assert published.verify("m", "v2")


# ---- loaders -----------------------------------------------------------------------
@pytest.fixture
def torch_load_calls(monkeypatch):
    """Every torch.load call, which would unpickle: none may happen."""
    import torch

    calls = []

    def spy(*args, **kwargs):
        calls.append(args[:1])
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", spy)
    return calls


def pickle_only_folder(tmp_path, config_folder):
    """config.json (no auto_map) and only a hostile pytorch_model.bin."""
    folder = tmp_path / "pickle-only"
    folder.mkdir()
    shutil.copy(config_folder / "config.json", folder / "config.json")
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(hostile_pickle(marker))
    return folder, marker


def test_the_hostile_pickle_would_run(tmp_path):
    """So that the loader tests below would notice if it were unpickled."""
    pickle.loads(hostile_pickle(tmp_path / "ran"))
    assert (tmp_path / "ran").is_dir()


def test_classifier_loaders_never_unpickle(tiny_model_dir, tmp_path, torch_load_calls):
    from services.core.modeling import load_classifier_for_serving, load_classifier_for_training

    folder, marker = pickle_only_folder(tmp_path, tiny_model_dir)
    with pytest.raises(OSError, match="model.safetensors"):
        load_classifier_for_serving(folder)
    with pytest.raises(OSError, match="model.safetensors"):
        load_classifier_for_training(str(folder), {0: "a", 1: "b"}, 0)
    assert not marker.exists() and torch_load_calls == []


def test_causal_lm_loaders_never_unpickle(tmp_path, torch_load_calls):
    from transformers import GPT2Config

    from services.core.modeling import load_causal_lm_for_serving, load_causal_lm_for_training

    config_dir = tmp_path / "cfg"
    GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50).save_pretrained(config_dir)
    folder, marker = pickle_only_folder(tmp_path, config_dir)
    with pytest.raises(OSError, match="model.safetensors"):
        load_causal_lm_for_serving(folder)
    with pytest.raises(OSError, match="model.safetensors"):
        load_causal_lm_for_training(str(folder), tokenizer=None)
    assert not marker.exists() and torch_load_calls == []


def test_safetensors_wins_over_a_pickle_beside_it(checkpoint, tmp_path, torch_load_calls):
    from services.core.modeling import load_classifier_for_serving

    marker = tmp_path / "unpickled"
    (checkpoint / "pytorch_model.bin").write_bytes(hostile_pickle(marker))
    model, tokenizer = load_classifier_for_serving(checkpoint)
    assert model.config.num_labels == 2 and tokenizer("good film")["input_ids"]
    assert not marker.exists() and torch_load_calls == []


def test_every_loader_asks_for_safetensors_and_no_remote_code(monkeypatch):
    """Each loader's from_pretrained call, whatever the folder holds."""
    import transformers

    import services.core.modeling as modeling

    seen = {}

    class Stop(Exception):
        pass

    def recorder(label):
        def from_pretrained(ref, *args, **kwargs):
            seen[label] = kwargs
            raise Stop
        return from_pretrained

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained",
                        recorder("classifier"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        recorder("causal"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        recorder("tokenizer"))
    calls = {
        "classifier serving": lambda: modeling.load_classifier_for_serving("x"),
        "classifier training": lambda: modeling.load_classifier_for_training("x", {0: "a"}, 0),
        "causal serving": lambda: modeling.load_causal_lm_for_serving("x"),
        "causal training": lambda: modeling.load_causal_lm_for_training("x", None),
        "tokenizer": lambda: modeling.load_tokenizer("x"),
    }
    for what, call in calls.items():
        seen.clear()
        with pytest.raises(Stop):
            call()
        (kwargs,) = seen.values()
        if what != "tokenizer":
            assert kwargs.get("use_safetensors") is True, what
        assert kwargs.get("trust_remote_code") is False, what


# ---- hostile safetensors headers -----------------------------------------------------
F32x2 = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


def st_bytes(header=None, payload=b"", raw=None, length=None) -> bytes:
    raw = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + payload


class CountingOpen:
    """open() for safetensors_check that counts the bytes it reads."""

    def __init__(self):
        self.read = 0

    def __call__(self, path, mode="r"):
        return _CountedFile(open(path, mode), self)


class _CountedFile:
    def __init__(self, fh, counter):
        self.fh, self.counter = fh, counter

    def read(self, n=-1):
        data = self.fh.read(n)
        self.counter.read += len(data)
        return data

    def fileno(self):
        return self.fh.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


HOSTILE = {
    # name: (file bytes, message, most bytes the check may read)
    "length 2**63": (st_bytes(F32x2, b"\0" * 8, length=2**63), "exceeds the file", 8),
    "length 2**64-1": (st_bytes(F32x2, b"\0" * 8, length=2**64 - 1), "exceeds the file", 8),
    "length past the end": (st_bytes(F32x2, b"", length=200), "exceeds the file", 8),
    "length zero": (st_bytes(F32x2, b"\0" * 8, length=0), "not valid JSON", None),
    "too short": (b"\x05\0\0", "too short", None),
    "not JSON": (st_bytes(raw=b"{not json at all}"), "not valid JSON", None),
    "not UTF-8": (st_bytes(raw=b'{"\xff\xfe": 1}'), "not valid JSON", None),
    "a JSON list": (st_bytes(raw=b"[1, 2]"), "not valid JSON", None),
    "nested 100k deep": (st_bytes(raw=b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
                         "not valid JSON", None),
    "repeated key": (st_bytes(raw=b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": '
                              b'[0, 4]}, "a": {"dtype": "F32", "shape": [1], '
                              b'"data_offsets": [4, 8]}}', payload=b"\0" * 8),
                     "repeats the key", None),
    "overlap": (st_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                         b"\0" * 12), "overlap", None),
    "overlap by an empty tensor": (
        st_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                  "z": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}}, b"\0" * 8),
        "overlap", None),
    "truncated data": (st_bytes(F32x2, b"\0" * 4), "outside the file", None),
    "gap": (st_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
                     b"\0" * 8), "gap of 4 bytes", None),
    "bytes after the last tensor": (st_bytes(F32x2, b"\0" * 12), "belong to no tensor", None),
    "shape does not match offsets": (
        st_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
        "does not match dtype x shape", None),
    "dtype does not match offsets": (
        st_bytes({"a": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
        "does not match dtype x shape", None),
    "a million huge dimensions": (
        st_bytes({"a": {"dtype": "U8", "shape": [2**62] * 1_000_000,
                        "data_offsets": [0, 8]}}, b"\0" * 8),
        "does not match dtype x shape", None),
    "unknown dtype": (st_bytes({"a": {"dtype": "PICKLE", "shape": [8],
                                      "data_offsets": [0, 8]}}, b"\0" * 8),
                      "unknown dtype", None),
    "dtype not a string": (st_bytes({"a": {"dtype": ["F32"], "shape": [2],
                                           "data_offsets": [0, 8]}}, b"\0" * 8),
                           "unknown dtype", None),
    "negative offset": (st_bytes({"a": {"dtype": "F32", "shape": [2],
                                        "data_offsets": [-8, 0]}}, b"\0" * 8),
                        "data_offsets", None),
    "reversed offsets": (st_bytes({"a": {"dtype": "F32", "shape": [0],
                                         "data_offsets": [8, 0]}}, b"\0" * 8),
                         "data_offsets", None),
    "three offsets": (st_bytes({"a": {"dtype": "F32", "shape": [2],
                                      "data_offsets": [0, 8, 8]}}, b"\0" * 8),
                      "data_offsets", None),
    "boolean in shape": (st_bytes({"a": {"dtype": "F32", "shape": [True, 2],
                                         "data_offsets": [0, 8]}}, b"\0" * 8),
                         "shape", None),
    "entry not an object": (st_bytes({"a": [0, 8]}, b"\0" * 8), "not a JSON object", None),
    "metadata not strings": (st_bytes({**F32x2, "__metadata__": {"x": 1}}, b"\0" * 8),
                             "__metadata__", None),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_header_is_refused_cleanly(case, tmp_path, monkeypatch):
    data, message, max_read = HOSTILE[case]
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    counting = CountingOpen()
    monkeypatch.setattr(safetensors_check, "open", counting, raising=False)
    started = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        check_safetensors(path)
    assert time.perf_counter() - started < 2.0
    assert counting.read <= (max_read if max_read is not None else len(data))


def test_header_over_the_limit_is_not_read(tmp_path, monkeypatch):
    """A header length the file could hold but no real file has (a sparse file)."""
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{")
        fh.truncate(MAX_HEADER_BYTES + 64)
    counting = CountingOpen()
    monkeypatch.setattr(safetensors_check, "open", counting, raising=False)
    with pytest.raises(ValueError, match="MiB limit"):
        check_safetensors(path)
    assert counting.read == 8


def test_sound_files_pass_and_match_the_safetensors_library(tiny_model_dir, tmp_path):
    from safetensors import safe_open

    weights = tiny_model_dir / "model.safetensors"
    with safe_open(str(weights), "np") as fh:
        assert check_safetensors(weights) == len(list(fh.keys())) > 0
    padded = tmp_path / "padded.safetensors"  # header padded with spaces, empty tensor
    padded.write_bytes(st_bytes(raw=json.dumps(
        {**F32x2, "e": {"dtype": "BF16", "shape": [0, 3], "data_offsets": [8, 8]},
         "__metadata__": {"format": "pt"}}).encode() + b"    ", payload=b"\0" * 8))
    assert check_safetensors(padded) == 2
    with safe_open(str(padded), "np") as fh:
        assert sorted(fh.keys()) == ["a", "e"]


@pytest.mark.parametrize("cut", ["one byte", "half"])
def test_truncated_weights_are_refused_on_verify(published, cut, tmp_path):
    weights = published.local_copy("m", "v1") / "model.safetensors"
    data = weights.read_bytes()
    plant(published, "model.safetensors", data[:-1] if cut == "one byte"
          else data[:len(data) // 2])
    with pytest.raises(CorruptVersion, match="model.safetensors: .*(outside the file|exceeds)"):
        published.verify("m", "v1")


@pytest.mark.parametrize("case", ["length 2**63", "nested 100k deep", "overlap", "gap",
                                  "dtype not a string"])
def test_hostile_weights_are_refused_on_publish_and_verify(published, checkpoint, case,
                                                          tmp_path):
    data = HOSTILE[case][0]
    (checkpoint / "model.safetensors").write_bytes(data)
    with pytest.raises(RegistryError, match="model.safetensors: "):
        published.publish("m", checkpoint, classification_manifest())
    assert published.versions("m") == ["v1"]
    assert not list((tmp_path / "reg" / "m").glob(".staging-*"))
    plant(published, "model.safetensors", data)
    with pytest.raises(CorruptVersion, match=f"m v1: model.safetensors: .*{HOSTILE[case][1]}"):
        published.verify("m", "v1")
