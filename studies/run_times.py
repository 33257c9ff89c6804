"""When each run of a comparison ran: records are written without timestamps (so they rebuild byte-identically), so
this reads the times from the run folders themselves.

    python studies/run_times.py runs/replication/replication > results/replication/replication/run_times.txt

For each run: the start (the time in its TensorBoard event file's name, written when training starts, step 0's
evaluation before any step) and the end (its last evaluation file's modification time), in UTC. A resumed run has
one event file per start; the earliest is shown.
"""
import sys
from datetime import datetime, timezone
from pathlib import Path


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def run_times(run: Path) -> tuple[str, str]:
    """(start, end) of one run folder, in UTC."""
    starts = [int(f.name.split(".")[3]) for f in (run / "tb").glob("events.out.tfevents.*")]
    ends = [f.stat().st_mtime for f in (run / "eval").glob("step_*.json")]
    return _utc(min(starts)), _utc(max(ends))


def main(out: Path) -> None:
    print("run\tstart (UTC)\tlast evaluation (UTC)")
    folders = [run for run in out.glob("runs/*/seed_*") if run.is_dir()]  # (not the runs' .log files)
    for run in sorted(folders, key=lambda r: run_times(r)[0]):
        start, end = run_times(run)
        print(f"{run.relative_to(out)}\t{start}\t{end}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
