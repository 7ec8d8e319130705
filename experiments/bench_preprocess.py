"""Preprocessing throughput on Adult: rows per second for each stage of a client's pipeline.

    python -m experiments.bench_preprocess [--repeats 5]

Stages: reading a CSV file (privet's reader, with line-level checks), cleaning, fitting the
local transform, applying it, and computing the federated statistics. Medians over repeats,
on the whole train file (32,561 rows) in one process with one torch thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from privet.common.config import PreprocessConfig
from privet.common.data import adult, federated, tables
from privet.common.data.datasets import encode_labels
from privet.common.data.preprocess import Schema, clean, fit_local


def _median_seconds(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    raw = adult.load_raw("train")
    schema = Schema(tuple(adult.NUMERIC), {c: tuple(v) for c, v in adult.CATEGORIES.items()},
                    adult.LABEL, tuple(adult.CLASSES), dict(adult.BOUNDS))
    options = PreprocessConfig()
    markers = ["?"]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "adult.csv"
        raw.to_csv(path, index=False)
        cleaned, _ = clean(raw, numeric=adult.NUMERIC, label=adult.LABEL,
                           missing_markers=markers)
        labels = encode_labels(cleaned[adult.LABEL], adult.CLASSES, "adult")
        transform = fit_local(cleaned, schema, options)
        stages = {
            "read CSV (privet reader)": lambda: tables.read_table(path, label=adult.LABEL),
            "clean": lambda: clean(raw, numeric=adult.NUMERIC, label=adult.LABEL,
                                   missing_markers=markers),
            "fit local transform": lambda: fit_local(cleaned, schema, options),
            "apply transform": lambda: transform.apply(cleaned),
            "federated statistics": lambda: federated.client_statistics(
                cleaned, labels, schema, options.bins),
        }
        print(f"Adult train file: {len(raw)} rows; {os.cpu_count()} cores; median of "
              f"{repeats} repeats")
        print(f"{'stage':28} {'seconds':>8} {'rows/s':>12}")
        total = 0.0
        for name, work in stages.items():
            seconds = _median_seconds(work, repeats)
            if name != "read CSV (privet reader)":
                total += seconds
            print(f"{name:28} {seconds:8.3f} {len(raw) / seconds:12,.0f}")
        print(f"{'clean + fit + apply + stats':28} {total:8.3f} {len(raw) / total:12,.0f}")


if __name__ == "__main__":
    main()
