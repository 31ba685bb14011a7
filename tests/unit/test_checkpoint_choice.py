"""Which checkpoint a finished run publishes: the best evaluation, or the last one
where the two are within the eval set's noise (issue 33: an epoch picked by the luck
of a small eval set's draw)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from services.core.errors import TrainingFailed
from services.training.promotion import last_within_noise
from services.training.run import published_checkpoint


def evaluation(epoch: int, accuracy: float, n: int) -> dict:
    right = round(accuracy * n)
    half = n // 2
    # two balanced classes; the errors split between them
    wrong_a = (n - right) // 2
    wrong_b = n - right - wrong_a
    return {"epoch": epoch, "eval_accuracy": right / n,
            "confusion_matrix": [[half - wrong_a, wrong_a], [wrong_b, n - half - wrong_b]]}


def test_on_a_small_eval_set_an_early_best_within_the_noise_gives_way_to_the_last():
    keep_last, why = last_within_noise(evaluation(4, 0.86, 100), evaluation(14, 0.84, 100))
    assert keep_last
    assert "last epoch (14, accuracy 0.8400)" in why and "epoch 4, 0.8600" in why
    assert "on 100 examples" in why


def test_a_best_evaluation_clearly_ahead_is_kept():
    # 0.95 against 0.93 on 6,000 examples: 6 standard errors apart
    keep_last, why = last_within_noise(evaluation(2, 0.95, 6000), evaluation(3, 0.93, 6000))
    assert not keep_last and "published epoch 2, the best evaluation" in why
    # the same gap on 100 examples is noise
    assert last_within_noise(evaluation(2, 0.95, 100), evaluation(3, 0.93, 100))[0]


def test_without_accuracies_the_best_is_kept_silently():
    assert last_within_noise({"eval_loss": 1.0}, {"eval_loss": 2.0}) == (False, "")


class FakeResult(SimpleNamespace):
    def get_best_checkpoint(self, metric, mode):
        pick = max if mode == "max" else min
        return pick(self.best_checkpoints, key=lambda cm: cm[1][metric])[0] \
            if self.best_checkpoints else None


def ckpt(path):
    return SimpleNamespace(path=path)


class Classifier:
    metric, metric_mode = "eval_accuracy", "max"

    def prefer_last(self, best, last):
        return last_within_noise(best, last)


class Generator:
    metric, metric_mode = "eval_loss", "min"

    def prefer_last(self, best, last):
        return False, ""


def test_published_checkpoint_takes_the_last_within_the_noise_and_says_why():
    best, last = ckpt("/run/c4"), ckpt("/run/c14")
    result = FakeResult(checkpoint=last, metrics=evaluation(14, 0.84, 100),
                        best_checkpoints=[(best, evaluation(4, 0.86, 100)),
                                          (last, evaluation(14, 0.84, 100))])
    said = []
    chosen, metrics = published_checkpoint(result, Classifier(), said.append)
    assert chosen is last and metrics["epoch"] == 14
    assert len(said) == 1 and "published the last epoch" in said[0]
    # the last one is also the best: nothing to choose, nothing said
    result.best_checkpoints = [(best, evaluation(4, 0.80, 100)),
                               (last, evaluation(14, 0.84, 100))]
    said.clear()
    assert published_checkpoint(result, Classifier(), said.append)[0] is last and not said


def test_published_checkpoint_keeps_the_best_of_a_task_without_the_rule():
    best, last = ckpt("/run/c1"), ckpt("/run/c2")
    result = FakeResult(checkpoint=last, metrics={"epoch": 2, "eval_loss": 2.5},
                        best_checkpoints=[(best, {"epoch": 1, "eval_loss": 2.4}),
                                          (last, {"epoch": 2, "eval_loss": 2.5})])
    chosen, metrics = published_checkpoint(result, Generator(), print)
    assert chosen is best and metrics["epoch"] == 1


def test_no_checkpoint_at_all_fails_the_run():
    result = FakeResult(checkpoint=None, metrics={}, best_checkpoints=[])
    with pytest.raises(TrainingFailed, match="no checkpoint"):
        published_checkpoint(result, Classifier(), print)
