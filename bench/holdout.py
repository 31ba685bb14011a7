"""Split a labelled file into a training part and a held-out test part, stratified by label.

    .venv/bin/python bench/holdout.py ../shared/data/agnews/train.tsv --columns text,label \
        --test-fraction 0.1 --out /tmp/agnews

writes OUT/train.tsv and OUT/test.tsv (with a header row), using the same stratified
split as `tuneserve train` (services/core/data.py), so `tuneserve eval` can measure a model on
rows that neither its training nor its checkpoint selection saw (docs/quality.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from services.core.data import load_labelled, stratified_split_indices

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--columns", default=None, help="for files without a header, e.g. text,label")
    parser.add_argument("--text-column", default=None)
    parser.add_argument("--label-column", default=None)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    columns = args.columns.split(",") if args.columns else None
    data = load_labelled(args.data, args.text_column, args.label_column, columns)
    train, test = stratified_split_indices(data.labels, args.test_fraction, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, idx in (("train.tsv", train), ("test.tsv", test)):
        with (out / name).open("w", encoding="utf-8", newline="") as fh:
            # unquoted, as tuneserve reads TSV: a quote is just a character
            fh.write("text\tlabel\n")
            for i in idx:
                fields = (data.texts[i], str(data.labels[i]))
                if any(c in f for f in fields for c in "\t\r\n"):
                    raise SystemExit(f"row {i + 1}: a tab or line break in a field "
                                     "cannot be written to TSV")
                fh.write("\t".join(fields) + "\n")
        print(f"{out / name}: {len(idx)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
