"""A run's compact record: the part of a run folder that `results/` holds and every table and plot is rebuilt from.

    record/metrics.jsonl.gz   every line of metrics.jsonl (training diagnostics, test and validation evaluations)
    record/evals.csv.gz       split,step,problem,pass_at_1: every evaluation's per-problem score (c / n)
    record/config.yaml        the run's config

`trb train trb:configs/miniature_arith.yaml method.name=opd` (60 steps, 7 evaluations of 200 test and 100
validation problems) left a record of 16.6 kB, so a study of a few hundred such runs fits in a few MB. Files are
gzipped without a timestamp, so the same run always gives the same bytes.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
from pathlib import Path

EVAL_FILES = (("test", "step_*.json"), ("val", "val_step_*.json"))


def write_gzip(path: Path, text: str) -> None:
    """text gzipped with no name or time in the header: identical text, identical bytes."""
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(text.encode())


def read_text(path: Path) -> str:
    """A text file, or its gzipped form PATH.gz when only that exists."""
    path = Path(path)
    if path.exists():
        return path.read_text()
    return gzip.decompress(Path(f"{path}.gz").read_bytes()).decode()


def write_record(run: Path, dest: Path) -> None:
    """The compact record of the run folder `run` into `dest` (created)."""
    dest.mkdir(parents=True, exist_ok=True)
    write_gzip(dest / "metrics.jsonl.gz", (run / "metrics.jsonl").read_text())
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["split", "step", "problem", "pass_at_1"])
    for split, pattern in EVAL_FILES:
        for path in sorted((run / "eval").glob(pattern)):
            evaluation = json.loads(path.read_text())
            writer.writerows([split, evaluation["step"], k, repr(score)]
                             for k, score in enumerate(evaluation["per_problem"]))
    write_gzip(dest / "evals.csv.gz", table.getvalue())
    shutil.copyfile(run / "config.yaml", dest / "config.yaml")
