"""The promotion gate compares a run with production on the same rows (issue 30, point 5).

Two runs' eval metrics, each on its own eval set, do not compare: a run whose eval set
is easier than production's would win on paper. `train --promote` scores production
and the run's checkpoint on the run's eval rows with the same code, and the manifest
keeps both numbers. The models are tiny BERTs whose weights are set by hand to classify
by keywords (no training), so each one's accuracy on given rows is known exactly:
"full" knows every keyword, "partial" not "great" (a text with only that word is
neutral, and a neutral text reads as the first label, "neg").
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from services.core.config import TrainConfig
from services.core.registry import Registry
from services.training.promotion import decide
from services.training.run import Fitted, Prepared, TrainResult, publish_best, quality_record
from services.training.tasks import ClassificationTask
from tests.helpers import build_tokenizer, write_csv

LABELS = ["neg", "pos"]
POSITIVE, NEGATIVE = ("good", "great"), ("bad", "awful")
FILLER = ("the film was", "this plot is", "our cast seemed", "that ending felt")


def _texts() -> list[str]:
    return [f"{f} {w}" for f in FILLER for w in (*POSITIVE, *NEGATIVE)] * 5


def keyword_bert(folder: Path, positive: tuple[str, ...], negative: tuple[str, ...]) -> Path:
    """A 1-layer BERT that answers "pos" when a text has more of `positive` than of
    `negative`, and "neg" for a text with neither (equal logits, the first wins):
    keyword embeddings +-(e0 - e1), everything else zero, uniform attention (the [CLS]
    row averages the text), identity value/output/pooler maps."""
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig

    tokenizer = build_tokenizer(_texts(), vocab_size=120)
    hidden = 8
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=1,
                        num_attention_heads=1, intermediate_size=8,
                        max_position_embeddings=64, num_labels=2,
                        id2label=dict(enumerate(LABELS)),
                        label2id={x: i for i, x in enumerate(LABELS)})
    model = AutoModelForSequenceClassification.from_config(config)
    direction = torch.zeros(hidden)
    direction[0], direction[1] = 1.0, -1.0
    eye = torch.eye(hidden)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm.weight" not in name:
                param.zero_()
        for words, sign in ((positive, 1.0), (negative, -1.0)):
            for word in words:
                token = tokenizer.convert_tokens_to_ids(word)
                assert token != tokenizer.unk_token_id, word
                model.bert.embeddings.word_embeddings.weight[token] = sign * direction
        layer = model.bert.encoder.layer[0]
        for linear in (layer.attention.self.value, layer.attention.output.dense,
                       model.bert.pooler.dense):
            linear.weight.copy_(eye)
        model.classifier.weight[0] = -direction
        model.classifier.weight[1] = direction
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("keyword-berts")
    return {"full": keyword_bert(root / "full", POSITIVE, NEGATIVE),
            "partial": keyword_bert(root / "partial", ("good",), NEGATIVE)}


# The run's eval rows: 16 positive (4 with "great" only), 16 negative.
ROWS = ([f"{f} {w}" for f in FILLER for w in ("good", "good", "good", "great")]
        + [f"{f} {w}" for f in FILLER for w in ("bad", "bad", "awful", "awful")])
ROW_LABELS = ["pos"] * 16 + ["neg"] * 16


class Checkpoint:
    """What publish_best reads of a ray.train.Checkpoint."""

    def __init__(self, path: Path):
        self.path = str(path)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


def _publish_run(tmp_path: Path, registry: Registry, folder: Path, accuracy: float,
                 cm: list[list[int]], **fields) -> TrainResult:
    """publish_best of a finished `--promote` run of "sent" whose checkpoint is `folder`
    and whose own eval (on ROWS) measured `accuracy` with confusion matrix `cm`;
    `fields`: more of its config."""
    train = write_csv(tmp_path / "train.csv", [
        (f"{f} {w}", "pos" if w in POSITIVE else "neg")
        for f in FILLER for w in (*POSITIVE, *NEGATIVE)])
    cfg = TrainConfig(model=str(folder), train=str(train), name="sent",
                      registry=registry.uri, runs_dir=str(tmp_path / "runs"),
                      promote=True, **fields).resolve()
    task = ClassificationTask(cfg)
    task.id2label = dict(enumerate(LABELS))
    metrics = {"accuracy": accuracy, "macro_f1": accuracy, "loss": 0.3}
    best = {"epoch": 1, "confusion_matrix": cm}
    res = TrainResult(name="sent", version=None, promoted=False, metrics=metrics,
                      run_dir=str(tmp_path / "runs" / "r"), registry=registry.uri)
    fitted = Fitted(run_name="r", run_dir=tmp_path / "runs" / "r",
                    checkpoint=Checkpoint(folder), best_metrics=best, history=[],
                    samples_per_s=None, artifacts={})
    prep = Prepared(cfg, task, {}, {}, (ROWS, ROW_LABELS))
    publish_best(prep, fitted, res, None, quality_record(LABELS, best, metrics),
                 out=lambda line: None)
    return res


def _production(tmp_path: Path, folder: Path, accuracy: float) -> Registry:
    """A registry whose production "sent" v1 is `folder`, its manifest's accuracy
    measured on an eval set of its own."""
    registry = Registry(tmp_path / "registry")
    registry.publish("sent", folder, {"task": "classification", "labels": LABELS,
                                      "metrics": {"accuracy": accuracy}})
    assert registry.channel("sent") == "v1"
    return registry


def test_a_run_with_an_easier_eval_set_loses_to_production_on_the_same_rows(
        tmp_path, models):
    # Production (full) scored 0.85 on its own, harder eval set. The run's checkpoint
    # (partial) scores 0.875 on its own eval rows (it misses the 4 "great" rows): on
    # paper it wins; on the same rows production scores 1.0.
    registry = _production(tmp_path, models["full"], 0.85)
    res = _publish_run(tmp_path, registry, models["partial"], 0.875, [[16, 0], [4, 12]])
    assert (res.version, res.promoted) == ("v2", False)
    assert registry.channel("sent") == "v1"
    assert res.promotion == ("not promoted: accuracy 0.8750 is worse than production "
                             "v1's 1.0000 on this run's 32 eval rows")
    gate = registry.manifest("sent", "v2")["gate"]
    assert gate["metric"] == "accuracy" and gate["rows"] == 32
    assert gate["candidate"]["accuracy"] == pytest.approx(0.875)
    assert gate["production"]["version"] == "v1"
    assert gate["production"]["accuracy"] == pytest.approx(1.0)
    # the manifests alone would have promoted it
    ok, why = decide(registry, "sent", "v2", res.metrics, "accuracy", "max", None)
    assert ok and why.endswith("(each on its own eval set)")


def test_a_run_better_on_the_same_rows_is_promoted_whatever_production_recorded(
        tmp_path, models):
    # Production (partial) recorded 0.99 on an easy eval set of its own; on this run's
    # rows it scores 0.875 and the run's checkpoint (full) 1.0.
    registry = _production(tmp_path, models["partial"], 0.99)
    res = _publish_run(tmp_path, registry, models["full"], 1.0, [[16, 0], [0, 16]])
    assert (res.version, res.promoted) == ("v2", True)
    assert registry.channel("sent") == "v2"
    assert res.promotion == ("promoted: accuracy 1.0000 vs production v1's 0.8750 on "
                             "this run's 32 eval rows")
    assert registry.manifest("sent", "v2")["gate"]["production"]["accuracy"] == \
        pytest.approx(0.875)
