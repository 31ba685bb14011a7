"""Fixtures shared by the unit tests of the model runtime."""

from __future__ import annotations

import pytest

from tests.helpers import publish_toy_classifier


@pytest.fixture(scope="module")
def classifier_registry(tiny_model_dir, tmp_path_factory):
    """A registry holding one version (v1) of a tiny two-label classifier, "toy"."""
    return publish_toy_classifier(tiny_model_dir, tmp_path_factory.mktemp("classifier"))
