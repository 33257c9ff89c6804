"""Per-method rollout diagnostics of a comparison, from its committed records, means over seeds: mean beta, realized
KL and share of teacher tokens at step 1, share of positions at beta = 1 at step 40, the last step with any
blending, and teacher entropy at steps 1 and 10. The numbers quoted under RESULTS.md's method tables.

    python studies/method_diagnostics.py results/miniature/arith/methods
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from trb.report import read_metrics

COLUMNS = (("beta1", 1, "rollout/mean_beta"), ("rkl1", 1, "rollout/realized_kl"),
           ("fracb1@40", 40, "rollout/frac_beta_one"), ("fromT1", 1, "rollout/from_teacher"))
ENTROPY = (("Hteach1", 1), ("Hteach10", 10))


def main(folder: Path) -> None:
    for variant in sorted((folder / "runs").iterdir()):
        seeds = sorted(variant.glob("seed_*"))
        by_step: dict[int, list[dict]] = {}  # step -> each seed's training record of that step
        for seed in seeds:
            for record in read_metrics(seed):
                if "loss" in record:
                    by_step.setdefault(record["step"], []).append(record)

        def mean(step: int, key: str) -> float | None:
            values = [r[key] for r in by_step.get(step, []) if r.get(key) is not None]
            return round(statistics.mean(values), 3) if values else None

        last_blend = max((s for s, rs in by_step.items() if any(r.get("rollout/mean_beta", 0) > 0 for r in rs)),
                         default=0)
        cells = [f"{name} {mean(step, key)}" for name, step, key in COLUMNS]
        cells.append(f"last step with beta>0 {last_blend}")
        cells += [f"{name} {mean(step, 'teacher_entropy')}" for name, step in ENTROPY]
        print(variant.name, len(seeds), *cells)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
