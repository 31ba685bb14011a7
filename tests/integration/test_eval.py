"""`tuneserve eval` on the session's trained tiny BERT: locally from the registry and
through the live gRPC API, with the metrics code training uses."""

from __future__ import annotations

import json

import pytest

from services.cli import main
from services.core.data import load_labelled, split_indices
from services.core.evaluation import SUMMARY_KEYS
from services.core.registry import Registry
from tests.helpers import write_csv

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def noisy_csv(trained, tmp_path_factory):
    """The first 60 training rows with every 5th label flipped, so accuracy is < 1."""
    cfg, _ = trained
    data = load_labelled(cfg.train)
    flip = {"positive": "negative", "negative": "positive"}
    rows = [(t, flip[lab] if i % 5 == 0 else lab)
            for i, (t, lab) in enumerate(zip(data.texts[:60], data.labels[:60]))]
    return write_csv(tmp_path_factory.mktemp("eval") / "noisy.csv", rows), rows


def _eval_json(capsys, *args) -> dict:
    assert main(["eval", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_on_the_training_eval_split_reproduces_the_manifest(trained, tmp_path, capsys):
    cfg, _ = trained
    manifest = Registry(cfg.registry).manifest("toy", "v1")
    data = load_labelled(cfg.train)
    # The held-out split, made again the way the manifest says training made it.
    if manifest["data"]["split"].get("method") == "stratified by label":
        from services.core.data import stratified_split_indices

        _, ev = stratified_split_indices(data.labels, cfg.eval_fraction, cfg.seed)
    else:
        _, ev = split_indices(len(data.texts), cfg.eval_fraction, cfg.seed)
    split = write_csv(tmp_path / "split.csv", [(data.texts[i], data.labels[i]) for i in ev])
    out = _eval_json(capsys, "--data", str(split), "--registry", cfg.registry, "--model", "toy")
    assert out["version"] == "v1" and out["examples"] == len(ev) == 20
    assert out["confusion_matrix"] == manifest["confusion_matrix"]
    for key in SUMMARY_KEYS:
        assert out["metrics"][key] == pytest.approx(manifest["metrics"][key], abs=1e-12)
    assert out["per_class"] == manifest["per_class"]


def test_local_accuracy_is_the_share_of_right_predictions(trained, noisy_csv, capsys):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg, _ = trained
    path, rows = noisy_csv
    folder = Registry(cfg.registry).local_copy("toy", "v1")
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        preds = [model.config.id2label[int(model(**tok(t, return_tensors="pt")).logits.argmax())]
                 for t, _ in rows]
    right = sum(p == lab for p, (_, lab) in zip(preds, rows))
    assert 0 < right < len(rows)
    out = _eval_json(capsys, "--data", str(path), "--registry", cfg.registry,
                     "--model", "toy@v1", "--confusion-png", str(path.with_suffix(".png")))
    assert out["metrics"]["accuracy"] == pytest.approx(right / len(rows))
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grpc_eval_equals_local_eval(trained, server, noisy_csv, capsys):
    cfg, _ = trained
    path, rows = noisy_csv
    address = server.address
    local = _eval_json(capsys, "--data", str(path), "--registry", cfg.registry,
                       "--model", "toy")
    remote = _eval_json(capsys, "--data", str(path), "--address", address, "--model", "toy",
                        "--batch-size", "16")
    assert remote["source"] == "grpc" and remote["location"] == address
    assert remote["version"] == local["version"] == "v1"
    assert remote["labels"] == local["labels"] == ["negative", "positive"]
    assert remote["confusion_matrix"] == local["confusion_matrix"]
    assert remote["metrics"] == local["metrics"] and remote["per_class"] == local["per_class"]
    assert remote["examples"] == len(rows)


def test_grpc_eval_errors_exit_2(server, noisy_csv, tmp_path, capsys):
    path, _ = noisy_csv
    bad = write_csv(tmp_path / "bad.csv", [("a good film", "positive"), ("so so", "meh")])
    cases = [(["--model", "nope"], "--model: model 'nope' not found"),
             (["--model", "toy@v9"], "--model: "),
             (["--model", "tinygen"], "--model: tinygen is a generation model"),
             (["--model", "toy", "--data", str(bad)], "label 'meh' (1 example, first #2)")]
    for args, needle in cases:
        argv = ["eval", "--data", str(path), "--address", server.address, *args]
        assert main(argv) == 2, args
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err


def test_local_eval_refuses_a_generation_model(trained_generator, noisy_csv, capsys):
    gen_cfg, _ = trained_generator
    path, _ = noisy_csv
    assert main(["eval", "--data", str(path), "--registry", gen_cfg.registry,
                 "--model", "tinygen"]) == 2
    assert "tinygen v1 is a generation model" in capsys.readouterr().err
