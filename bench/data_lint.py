"""Benchmark: `tunelab data validate` + `tunelab data lint` on 100,000 Banking77-like rows.

    .venv/bin/python bench/data_lint.py [--rows 100000] [--seed 0] [--json OUT.json]

Rows are texts sampled from examples/banking77/train.csv with 0-2 random word edits
(replace, delete or insert a word drawn from the corpus), labelled with their category,
written as a CSV (text,category): many exact repeats, many near duplicates, as scraped
or augmented data has. Prints seconds and rows/s for validation and for lint, the
findings per kind, and, as the baseline in the same run, the near-duplicate recall
and precision of MinHash-LSH against brute-force exact Jaccard over every pair of the
first --baseline-rows distinct rows (and how long each takes on those rows).
Goal: validate + lint of 100,000 rows under 30 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tunelab.data.quality import near_dup, overlap  # noqa: E402
from tunelab.data.quality.lint import lint_report  # noqa: E402
from tunelab.data.validate import validate_file  # noqa: E402

BANKING77 = REPO / "examples" / "banking77" / "train.csv"


def make_rows(n: int, seed: int) -> list[tuple[str, str]]:
    with BANKING77.open(encoding="utf-8", newline="") as f:
        source = [(r["text"].strip(), r["category"]) for r in csv.DictReader(f)]
    rng = random.Random(seed)
    vocab = [w for text, _ in source for w in text.split()]
    rows = []
    for _ in range(n):
        text, label = rng.choice(source)
        words = text.split()
        for _ in range(rng.randint(0, 2)):
            op, at = rng.random(), rng.randrange(len(words))
            if op < 0.4:
                words[at] = rng.choice(vocab)
            elif op < 0.7 and len(words) > 2:
                del words[at]
            else:
                words.insert(at, rng.choice(vocab))
        rows.append((" ".join(words), label))
    return rows


def baseline(records: list, threshold: float, rows: int) -> dict:
    """Near-duplicate rows among the first `rows` distinct rows: MinHash-LSH vs brute-force exact Jaccard."""
    exact = overlap.exact_duplicates(records)
    distinct = [r for i, r in enumerate(records) if i not in exact][:rows]
    texts = [near_dup.normalize(overlap.near_text(r.messages)) for r in distinct]
    t0 = time.perf_counter()
    found = set(near_dup.earlier_matches(texts, threshold))
    lsh_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hashes, offsets = near_dup.shingles(texts)
    sets = [set(hashes[offsets[i]: offsets[i + 1]].tolist()) for i in range(len(texts))]
    truth = set()
    for i, j in itertools.combinations(range(len(texts)), 2):
        if j not in truth and len(sets[i] & sets[j]) / len(sets[i] | sets[j]) >= threshold:
            truth.add(j)
    brute_s = time.perf_counter() - t0
    hit = len(found & truth)
    return {"rows": len(texts), "pairs": len(texts) * (len(texts) - 1) // 2, "rows_with_near_duplicate": len(truth),
            "recall": hit / len(truth) if truth else 1.0, "precision": hit / len(found) if found else 1.0,
            "lsh_seconds": round(lsh_s, 3), "brute_force_seconds": round(brute_s, 3),
            "speedup": round(brute_s / lsh_s, 1) if lsh_s else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=near_dup.DEFAULT_THRESHOLD)
    parser.add_argument("--baseline-rows", type=int, default=1500)
    parser.add_argument("--json", type=Path, default=None, help="Also write the results to this JSON file.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "banking77_like.csv"
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(("text", "category"))
            writer.writerows(make_rows(args.rows, args.seed))
        t0 = time.perf_counter()
        report = validate_file(path, "csv", input_column="text", output_column="category")
        validate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lint = lint_report(report, threshold=args.threshold)
    lint_s = time.perf_counter() - t0
    base = baseline(report.conversations, args.threshold, args.baseline_rows)

    total = validate_s + lint_s
    result = {
        "rows": report.rows, "validate_seconds": round(validate_s, 2), "lint_seconds": round(lint_s, 2),
        "total_seconds": round(total, 2), "rows_per_second": round(report.rows / total),
        "validate_rows_per_second": round(report.rows / validate_s), "lint_rows_per_second": round(report.rows / lint_s),
        "findings": lint.counts(), "near_duplicate_baseline": base,
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "cpus": __import__("os").cpu_count(),
                    "platform": platform.platform()},
    }
    print(f"{report.rows:,} rows: validate {validate_s:.1f} s ({result['validate_rows_per_second']:,} rows/s), "
          f"lint {lint_s:.1f} s ({result['lint_rows_per_second']:,} rows/s), "
          f"total {total:.1f} s ({result['rows_per_second']:,} rows/s)")
    print("findings: " + ", ".join(f"{k} {v:,}" for k, v in lint.counts().items()))
    print(f"near duplicates vs brute force on {base['rows']:,} distinct rows ({base['pairs']:,} pairs): "
          f"recall {base['recall']:.3f}, precision {base['precision']:.3f}, "
          f"{base['lsh_seconds']:.2f} s vs {base['brute_force_seconds']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
