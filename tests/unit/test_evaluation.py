import pytest

from services.core.evaluation import confusion_matrix, metrics_from_confusion


def test_metrics_match_hand_computation():
    true = [0, 0, 1, 1, 1, 2]
    pred = [0, 1, 1, 1, 0, 2]
    cm = confusion_matrix(true, pred, 3)
    assert cm == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]
    m = metrics_from_confusion(cm, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # precision: a 1/2, b 2/3, c 1; recall: a 1/2, b 2/3, c 1
    assert m["macro_precision"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m["macro_recall"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m["per_class"]["b"]["f1"] == pytest.approx(2 / 3)
    assert m["per_class"]["c"]["support"] == 1


def test_never_predicted_class_has_zero_precision():
    m = metrics_from_confusion(confusion_matrix([0, 1], [0, 0], 2))
    assert m["per_class"]["1"]["precision"] == 0.0
    assert m["accuracy"] == 0.5
