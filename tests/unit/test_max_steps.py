"""--max-steps is checked with the other flags: a clear one-line error for N < 1."""

from __future__ import annotations

import pytest

from services.cli import main
from services.core.config import TrainConfig
from services.core.errors import ConfigError
from services.training.run import bounds_record


@pytest.mark.parametrize("value", [0, -3, 2.5, "ten"])
def test_max_steps_must_be_a_positive_integer(value):
    with pytest.raises(ConfigError, match="'max_steps': must be a positive integer"):
        TrainConfig(model="m", train="t.csv", max_steps=value).resolve()


def test_max_steps_defaults_to_no_bound_and_resolves_into_optim():
    assert TrainConfig(model="m", train="t.csv").resolve().optim.max_steps is None
    assert TrainConfig(model="m", train="t.csv", max_steps=7).resolve().optim.max_steps == 7


def test_cli_max_steps_zero_is_one_line_naming_it(capsys, tmp_path):
    code = main(["train", "--model", "m", "--train", str(tmp_path / "t.csv"),
                 "--max-steps", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "'max_steps': must be a positive integer, got 0" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bounds_record_says_whether_the_bound_ended_the_run():
    assert bounds_record(None, 36) == {"max_steps": None, "steps": 36,
                                       "ended_by_max_steps": False}
    assert bounds_record(50, 36)["ended_by_max_steps"] is False
    assert bounds_record(36, 36)["ended_by_max_steps"] is True
