"""Fixtures shared by the unit tests of the model runtime."""

from __future__ import annotations

import pytest

from services.core.registry import Registry


@pytest.fixture(scope="module")
def classifier_registry(tiny_model_dir, tmp_path_factory):
    """A registry holding one version (v1) of a tiny two-label classifier, "toy"."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("classifier")
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    model.save_pretrained(folder / "ckpt")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder / "ckpt")
    reg = Registry(folder / "registry")
    reg.publish("toy", folder / "ckpt", {"task": "classification", "labels": ["neg", "pos"],
                                        "config": {"max_length": 64}, "metrics": {}})
    return reg
