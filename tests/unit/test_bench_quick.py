"""`make bench-quick`: the target runs the classify and generate benchmarks with
--quick, and --quick sets their short settings while a flag given on the command
line wins (argument parsing only: no Ray, no model)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_make_bench_quick_runs_both_benchmarks_quick():
    make = (REPO / "Makefile").read_text()
    recipe = re.search(r"^bench-quick:.*\n((?:\t.*\n)+)", make, re.M)
    assert recipe, "no bench-quick target"
    lines = [line.strip() for line in recipe.group(1).splitlines()]
    assert lines == ["$(PY) bench/serve.py --quick", "$(PY) bench/generate.py --quick"]


def test_serve_quick_settings_and_a_flag_that_wins():
    from bench import serve

    args, levels = serve.parse_args(["--quick"])
    assert levels == [1, 32]
    assert (args.duration_s, args.warmup_s, args.peer, args.breakdown_calls) == \
        (3.0, 1.0, False, 0)
    assert args.colocate and args.replica_grpc  # tuneserve serve's default layout
    args, levels = serve.parse_args(["--quick", "--concurrency", "4", "--peer",
                                     "--no-colocate"])
    assert levels == [4] and args.peer is True and args.duration_s == 3.0
    assert not args.colocate and args.replica_grpc
    args, levels = serve.parse_args([])
    assert levels == [1, 4, 16, 32, 64] and args.peer is True and args.duration_s == 10.0
    assert not args.colocate and not args.replica_grpc


def test_generate_quick_settings_and_a_flag_that_wins():
    from bench import generate

    args = generate.parse_args(["--quick"])
    assert (args.quick, args.repeats, args.new_tokens) == (True, 1, 32)
    assert args.colocate and args.replica_grpc
    args = generate.parse_args(["--quick", "--new-tokens", "8"])
    assert (args.repeats, args.new_tokens) == (1, 8)
    args = generate.parse_args([])
    assert (args.quick, args.repeats, args.new_tokens) == (False, 3, 64)


def test_serve_optimize_reaches_tuneserve_only(tmp_path):
    from bench import serve

    args, _ = serve.parse_args(["--quick", "--optimize", "bf16"])
    cfg = serve.serve_config(args, tmp_path, 9000)
    assert (cfg.optimize, cfg.dtype) == ("bf16", "auto")
    assert serve.serve_config(serve.parse_args(["--quick"])[0], tmp_path, 9000).optimize is None
