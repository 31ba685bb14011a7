"""`tuneserve eval` without Ray: a tiny BERT published to a registry in a temp folder,
evaluated locally through the CLI, and the --address path against a fake client."""

from __future__ import annotations

import json
import struct

import grpc
import pytest

from services.cli import main
from services.core.data import load_labelled
from services.evaluate import evaluate_remote, parse_model_ref
from services.core.evaluation import format_report, metrics_from_confusion, write_confusion_png
from services.protocol import pb
from services.core.registry import Registry
from tests.helpers import free_port, toy_sentiment_rows, write_csv, write_jsonl
from tests.unit.test_registry import fake_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _checkpoint(source, folder, labels, train_steps=0):
    """The tiny BERT relabelled in a checkpoint folder, after a few full-batch steps on
    toy sentiment rows (enough to tell most examples apart: a random one predicts a
    single class)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={lab: i for i, lab in enumerate(labels)}, ignore_mismatched_sizes=True)
    tok = AutoTokenizer.from_pretrained(source)
    if train_steps:
        train = toy_sentiment_rows(32, seed=7)
        enc = tok([t for t, _ in train], padding=True, return_tensors="pt")
        y = torch.tensor([int(lab == "positive") for _, lab in train])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(train_steps):
            model(**enc, labels=y).loss.backward()
            opt.step()
            opt.zero_grad()
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reg(tmp_path_factory, tiny_model_dir):
    """sent v1 (production), v2; num v1 with labels "0"/"1"; gen v1, a generation model."""
    root = tmp_path_factory.mktemp("eval-reg")
    registry = Registry(root / "registry")
    manifest = {"task": "classification", "labels": ["negative", "positive"],
                "config": {"max_length": 32}}
    sent = _checkpoint(tiny_model_dir, root / "ck-sent", ["negative", "positive"],
                       train_steps=12)
    registry.publish("sent", sent, manifest)
    registry.publish("sent", sent, manifest)
    num = _checkpoint(sent, root / "ck-num", ["0", "1"])
    registry.publish("num", num, {**manifest, "labels": ["0", "1"]})
    registry.publish("gen", fake_checkpoint(root / "ck-gen"),
                     {"task": "generation", "labels": []})
    return {"root": str(root / "registry"), "sent": sent}


@pytest.fixture(scope="module")
def rows():
    """40 toy rows, every 4th label flipped: no model gets them all right."""
    flip = {"positive": "negative", "negative": "positive"}
    return [(t, flip[lab] if i % 4 == 0 else lab)
            for i, (t, lab) in enumerate(toy_sentiment_rows(40, seed=3))]


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory, rows):
    return str(write_csv(tmp_path_factory.mktemp("eval-data") / "dev.csv", rows))


def _independent_predictions(folder, texts):
    """One text at a time through plain transformers: no batching, no sorting."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    labels = model.config.id2label
    with torch.no_grad():
        return [labels[int(model(**tok(t, truncation=True, max_length=32,
                                       return_tensors="pt")).logits.argmax())]
                for t in texts]


def _eval(reg, data, *extra):
    return main(["eval", "--data", str(data), "--registry", reg["root"], *extra])


def test_local_eval_matches_independent_predictions(reg, data_csv, rows, capsys):
    preds = _independent_predictions(reg["sent"], [t for t, _ in rows])
    truth = [lab for _, lab in rows]
    correct = sum(p == t for p, t in zip(preds, truth))
    cm = [[sum(1 for p, t in zip(preds, truth) if t == tl and p == pl)
           for pl in ("negative", "positive")] for tl in ("negative", "positive")]

    assert 0 < correct < 40 and all(cm[0][j] + cm[1][j] for j in (0, 1)), \
        "the fixture model should predict both classes, with some mistakes"

    assert _eval(reg, data_csv, "--model", "sent", "--json", "--batch-size", "7") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "sent" and out["version"] == "v1" and out["source"] == "registry"
    assert out["examples"] == 40 and out["labels"] == ["negative", "positive"]
    assert out["metrics"]["accuracy"] == pytest.approx(correct / 40)
    assert set(out["metrics"]) == {"accuracy", "macro_precision", "macro_recall", "macro_f1"}
    assert out["confusion_matrix"] == cm
    assert set(out["per_class"]) == {"negative", "positive"}
    assert set(out["per_class"]["positive"]) == {"precision", "recall", "f1", "support"}
    assert out["per_class"]["positive"]["support"] == truth.count("positive")
    assert out["data"]["path"] == data_csv and out["data"]["rows"] == 40
    assert out["data"]["text_column"] == "text" and len(out["data"]["sha256"]) == 64
    assert out["confusion_png"] is None and out["examples_per_s"] > 0

    assert _eval(reg, data_csv, "--model", "sent") == 0
    text = capsys.readouterr().out
    assert f"accuracy {correct / 40:.4f} ({correct}/40)" in text
    assert "sent v1 (registry" in text and "macro avg" in text
    assert "confusion matrix (rows: true label, columns: predicted label)" in text
    neg_row = next(line for line in text.splitlines() if line.startswith("negative ")
                   and len(line.split()) == 3)
    assert neg_row.split()[1:] == [str(cm[0][0]), str(cm[0][1])]


def test_version_limit_and_png(reg, data_csv, tmp_path, capsys):
    png = tmp_path / "plots" / "cm.png"
    assert _eval(reg, data_csv, "--model", "sent@v2", "--limit", "10", "--json",
                 "--confusion-png", str(png)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == "v2" and out["examples"] == 10
    assert sum(map(sum, out["confusion_matrix"])) == 10
    assert out["confusion_png"] == str(png)
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width > 100 and height > 100


def test_numeric_labels_match_label_names(reg, rows, tmp_path, capsys):
    numeric = [(t, int(lab == "positive")) for t, lab in rows]
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"sentence": t, "y": lab} for t, lab in numeric])
    assert _eval(reg, jsonl, "--model", "num", "--label-column", "y", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["labels"] == ["0", "1"] and out["examples"] == 40
    assert out["per_class"]["1"]["support"] == sum(lab for _, lab in numeric)
    tsv = tmp_path / "d.tsv"
    tsv.write_text("".join(f"{t}\t{lab}\n" for t, lab in numeric))
    assert _eval(reg, tsv, "--model", "num", "--columns", "text,label", "--json") == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == out["metrics"]
    # The same numbers mean nothing to a model whose labels are words.
    assert _eval(reg, jsonl, "--model", "sent", "--label-column", "y") == 2
    err = capsys.readouterr().err
    zeros = [i + 1 for i, (_, lab) in enumerate(numeric) if lab == 0]
    assert f"'0' ({len(zeros)} examples, first #{zeros[0]})" in err and "'1'" in err
    assert "negative, positive" in err


@pytest.mark.parametrize("args, rows_, needle", [
    (["--model", "sent"], [("a good film", "positive"), ("meh", "neutral")],
     "label column 'label': label 'neutral' (1 example, first #2) unknown to model sent v1"),
    (["--model", "sent", "--text-column", "body"], None, "no text column 'body'"),
    (["--model", "sent", "--label-column", "stars"], None, "no label column 'stars'"),
    (["--model", "nope"], None, "--model: model 'nope' not found"),
    (["--model", "sent@v9"], None, "--model: model 'sent' has no version 'v9'"),
    (["--model", "sent@2"], None, "--model: invalid version '2'"),
    (["--model", "gen"], None, "--model: gen v1 is a generation model"),
    # said before the data is read (a generation data set has no text column)
    (["--model", "gen", "--text-column", "prompt"], None,
     "--model: gen v1 is a generation model"),
    (["--model", "sent", "--confusion-png", "cm.txt"], None,
     "--confusion-png: a .png file name, got cm.txt"),
    (["--model", "sent", "--confusion-png", "/dev/null/cm.png"], None,
     "--confusion-png: cannot write /dev/null/cm.png"),
    (["--model", "sent", "--limit", "0"], None, "--limit: must be at least 1"),
    (["--model", "sent", "--batch-size", "0"], None, "--batch-size: must be at least 1"),
])
def test_bad_input_exits_2_naming_it(reg, data_csv, tmp_path, capsys, args, rows_, needle):
    data = write_csv(tmp_path / "bad.csv", rows_) if rows_ else data_csv
    assert _eval(reg, data, *args) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_file_and_registry_exit_2(reg, data_csv, tmp_path, capsys):
    assert _eval(reg, tmp_path / "none.csv", "--model", "sent") == 2
    assert "data file not found" in capsys.readouterr().err
    assert main(["eval", "--data", data_csv, "--registry", str(tmp_path / "noreg"),
                 "--model", "sent"]) == 2
    assert "--registry: no registry at" in capsys.readouterr().err


def test_unreachable_server_exits_2(data_csv, capsys):
    address = f"127.0.0.1:{free_port()}"
    assert main(["eval", "--data", data_csv, "--address", address, "--model", "sent",
                 "--timeout-s", "5"]) == 2
    err = capsys.readouterr().err
    assert f"--address {address}: server unreachable" in err
    assert "Traceback" not in err


# ---- --address against a fake client ---------------------------------------------------
class _RpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class FakeServer:
    """Classify: positive iff the text has a positive word; at most `limit` texts."""

    address = "fake:1"

    def __init__(self, limit=3, task="classification"):
        self.limit, self.task = limit, task
        self.calls: list[tuple[int, str]] = []

    def list_models(self, model):
        return pb.ListModelsResponse(models=[pb.ModelInfo(
            name=model, task=self.task, production_version="v3",
            labels=["negative", "positive"])])

    def classify(self, model, texts, version=""):
        self.calls.append((len(texts), version))
        if len(texts) > self.limit:
            raise _RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"texts: {len(texts)} texts; the limit is {self.limit} per request")
        results = []
        for t in texts:
            pos = any(w in t for w in ("good", "great", "fine", "lovely", "superb"))
            scores = sorted([("positive", 0.9 if pos else 0.1),
                             ("negative", 0.1 if pos else 0.9)], key=lambda s: -s[1])
            results.append(pb.Classification(
                label=scores[0][0], score=scores[0][1],
                scores=[pb.LabelScore(label=lab, score=s) for lab, s in scores]))
        return pb.ClassifyResponse(results=results, model=model, version="v3")


def test_remote_respects_the_servers_limit_and_pins_the_version(data_csv, rows):
    fake = FakeServer(limit=3)
    data = load_labelled(data_csv)
    report = evaluate_remote(fake, "sent", None, data, batch_size=10, progress=False)
    sizes = [n for n, _ in fake.calls]
    assert sizes[0] == 1 and 10 in sizes  # the probe, then one refused request
    accepted = [n for n in sizes if n <= 3]
    assert sum(accepted) == 40 and max(accepted) == 3
    assert {v for _, v in fake.calls} == {"v3"}  # production's, named in every request
    expected = sum((lab == "positive") == any(w in t for w in ("good", "great", "fine",
                                                                 "lovely", "superb"))
                   for t, lab in rows)
    assert report.metrics["accuracy"] == pytest.approx(expected / 40)
    assert report.to_json()["source"] == "grpc" and report.version == "v3"


def test_remote_auth_errors_name_the_token(data_csv):
    class Locked(FakeServer):
        def list_models(self, model):
            raise _RpcError(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid token")

    from services.core.errors import InvalidInput

    with pytest.raises(InvalidInput, match="UNAUTHENTICATED.*TUNESERVE_API_TOKEN"):
        evaluate_remote(Locked(), "sent", None, load_labelled(data_csv))


def test_a_text_the_server_refuses_is_named_by_its_example(data_csv):
    """The refused text comes from the status details' field (texts[i]), not the
    message: the message here names no field at all."""
    from services.client import CallError
    from services.core.errors import InvalidInput
    from services.protocol.status import Details, FieldViolation

    class Refusing(FakeServer):
        def classify(self, model, texts, version=""):
            if len(texts) > 1:
                raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "too many tokens",
                                Details(True, None, (FieldViolation("texts[1]",
                                                                    "600 tokens"),)))
            return super().classify(model, texts, version)

    with pytest.raises(InvalidInput, match=r"example #\d+: refused by the server: 600 tokens"):
        evaluate_remote(Refusing(limit=100), "sent", None, load_labelled(data_csv),
                        batch_size=10, progress=False)


def test_missing_token_file_exits_2(data_csv, tmp_path, capsys):
    assert main(["eval", "--data", data_csv, "--address", "127.0.0.1:1", "--model", "sent",
                 "--token-file", str(tmp_path / "no-token")]) == 2
    assert "token file not found" in capsys.readouterr().err


def test_remote_refuses_a_generation_model(data_csv):
    from services.core.errors import InvalidInput

    with pytest.raises(InvalidInput, match="generation model"):
        evaluate_remote(FakeServer(task="generation"), "gen", None, load_labelled(data_csv))


# ---- the additions to services/core/evaluation.py ---------------------------------------------
def test_format_report_and_png(tmp_path):
    cm = [[3, 1], [0, 4]]
    m = metrics_from_confusion(cm, ["cat", "dog"])
    text = format_report(m, cm, ["cat", "dog"])
    assert text.splitlines()[0] == "accuracy 0.8750 (7/8)"
    lines = text.splitlines()
    dog = next(line for line in lines if line.startswith("dog ") and "0.8889" in line)
    assert dog.split() == ["dog", "0.8000", "1.0000", "0.8889", "4"]
    assert any(line.split() == ["cat", "3", "1"] for line in lines)
    path = write_confusion_png(cm, ["cat", "dog"], tmp_path / "x" / "cm.png", title="t")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_parse_model_ref():
    assert parse_model_ref("sent") == ("sent", None)
    assert parse_model_ref("sent@v12") == ("sent", "v12")
    from services.core.errors import InvalidInput

    for bad in ("sent@", "@v1", "a/b", "sent@latest"):
        with pytest.raises(InvalidInput, match="--model"):
            parse_model_ref(bad)


def test_a_bad_address_is_refused_before_the_data_is_read(tmp_path, capsys):
    assert main(["eval", "--data", str(tmp_path / "absent.csv"), "--address",
                 "http://localhost:9000", "--model", "sent"]) == 2
    assert "expected host:port" in capsys.readouterr().err
