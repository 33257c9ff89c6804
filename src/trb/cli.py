"""The `trb` command.

    trb train CONFIG [key=value ...]          train (resume with resume=true)
    trb eval --model DIR [--teacher DIR] ...  avg@n pass@1 of a checkpoint
    trb prepare SETTING|FILE --out DIR        make a miniature teacher and base student
    trb demo                                   the embedded miniature: vanilla OPD and TRB side by side
    trb compare CONFIG --methods ... --seeds   methods x seeds, CIs and paired differences against OPD
    trb probe --student DIR --teacher DIR ...  the continuation probe
    trb tables FOLDER ...                      rebuild compare / probe tables and plots from their saved data
    trb inspect RUN                            an HTML page of logged rollouts, shaded by beta

User errors (bad options, config, data, paths, incompatible models, non-finite training, a run folder in use, a
full disk) print one line `trb: error: ...` and exit with code 2, without a traceback unless --debug is given.
Options, paths and config values are checked before torch and transformers are imported, so such errors come back
at once. A training run stopped by SIGTERM/SIGINT, at any moment from start to exit, saves any new state and exits
with code 75 (rerun with resume=true); so does `trb prepare` (rerun the same command).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

from trb import preflight
from trb.errors import TrbError
from trb.paths import resolve_builtin
from trb.stopping import Stopped, StopSignals

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # stopped by SIGTERM/SIGINT after saving a checkpoint: rerun with resume=true
EXIT_INTERRUPTED = 130  # Ctrl-C outside the steps that save a checkpoint first

# The built-in settings, which are also the `trb prepare` presets: a bad name fails before torch is imported.
SETTINGS = preflight.SETTINGS


class UsageError(TrbError):
    """A bad command-line option or path."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`trb <command>: error: ...`, exit 2) instead of the usage block."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _writable_folder(path: str, option: str) -> Path:
    """A folder that exists or can be created: checked without creating anything."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{option} {path!r} is a file, not a folder; choose another {option}")
    ancestor = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not ancestor.is_dir():
        raise UsageError(f"{option} {path!r} cannot be created: {str(ancestor)!r} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path!r} is not writable ({str(ancestor)!r} denies writing)")
    return folder


def _log(message: str) -> None:
    """A progress line on stderr that leaves a progress bar whole."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def cmd_train(args) -> int:
    if not args.config.startswith("trb:") and not Path(args.config).is_file():
        raise UsageError(f"config file {args.config!r} not found")
    from trb.config import load_config

    cfg = load_config(args.config, args.overrides)  # checked before torch is imported: a bad value fails at once
    preflight.train_paths(cfg, dry_run=args.dry_run)  # and every path it names
    _quiet_libraries()
    from trb.train import dry_run, train

    if args.dry_run:
        report = dry_run(cfg, log=lambda message: None, signals=args.signals, threads=args.threads)
        for warning in report["warnings"]:
            _log(f"trb: warning: {warning}")
        print(json.dumps(report))
        return 0
    summary = train(cfg, log=_log, signals=args.signals, threads=args.threads)
    print(json.dumps(summary))
    return 0 if summary["status"] == "completed" else EXIT_PREEMPTED


def cmd_eval(args) -> int:
    preflight.model_path(args.model, "--model")
    if args.teacher is not None:
        preflight.model_path(args.teacher, "--teacher")
    preflight.problem_source(args.data, "--data")
    if args.all and args.data in SETTINGS:
        raise UsageError(f"--all scores every problem of a file; --data {args.data} is a generated setting (use "
                         "--problems N)")
    if args.out:
        _writable_folder(str(Path(args.out).parent), "--out's folder")
    _quiet_libraries()
    import torch

    from trb.evaluate import evaluate
    from trb.models import load_causal_lm, load_tokenizer, vocab_space
    from trb.tasks import load_problems, problem_splits
    from trb.loading import resolve_device, set_threads

    chosen = set_threads(args.threads)
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.model)
    student = load_causal_lm(args.model, device)
    teacher = load_causal_lm(args.teacher, device) if args.teacher else None
    vocab = vocab_space(tokenizer, load_tokenizer(args.teacher) if args.teacher else None, student, teacher)
    if args.all:
        problems = load_problems(args.data)
    else:
        _, problems = problem_splits(args.data, 1, args.problems, args.data_seed, fields=None)
    _log(f"evaluating avg@{args.n} pass@1 on {len(problems)} problems; {chosen}")  # once everything is loaded
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        result = evaluate(student, tokenizer, problems, vocab, n_samples=args.n, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch, seed=args.seed, teacher=teacher, system_prompt=args.system_prompt)
    record = {"model": args.model, "data": args.data, "problems": len(problems), **result.as_dict()}
    if args.out:
        Path(args.out).write_text(json.dumps({**record, "per_problem": result.per_problem}, indent=1))
    print(json.dumps(record))
    return 0


def _prepare_summary(out: str, report: dict, status: str) -> str:
    """The line `trb prepare` prints for a finished pair: both models' sizes and test pass@1, wall times, warnings."""
    summary = {role: {"parameters": report[role]["parameters"], "test_pass_at_1": report[role]["test"]["pass_at_1"]}
               for role in ("teacher", "student")}
    return json.dumps({"status": status, "out": out, **summary, "wall_s": report["wall_s"],
                       "warnings": report["warnings"]})


def cmd_prepare(args) -> int:
    if args.source not in SETTINGS and not Path(args.source).is_file():
        raise UsageError(f"source {args.source!r} is neither a setting ({', '.join(SETTINGS)}) nor a problem file")
    preflight.problem_source(args.source, "source")
    _writable_folder(args.out, "--out")
    if (args.teacher_more_steps or args.student_from) and not args.teacher_from:
        raise UsageError("--teacher-more-steps and --student-from need --teacher-from (the tokenizer comes with it)")
    for role in ("teacher", "student"):
        folder = getattr(args, f"{role}_from")
        if folder is not None:
            preflight.model_path(folder, f"--{role}-from")
            if not (resolve_builtin(folder) / "config.json").is_file():
                raise UsageError(f"--{role}-from {folder!r} is not a prepared {role} folder (no config.json)")
    from dataclasses import replace

    from trb.miniature.config import PRESETS, finished_pair, prepare_settings, with_steps

    preset = args.preset or (args.source if args.source in PRESETS else "word")
    config = with_steps(replace(PRESETS[preset], seed=args.seed), args.teacher_steps, args.student_steps)
    settings = prepare_settings(args.source, config, args.teacher_from, args.teacher_more_steps or 0,
                                args.student_from)
    done = finished_pair(Path(args.out), settings, args.overwrite)  # refuses a pair of other settings, untouched
    if done is not None:
        print(f"trb prepare: {args.out} holds the finished pair of this command; nothing to do (--overwrite makes "
              "it again)", file=sys.stderr)
        print(_prepare_summary(args.out, done, "done"))
        return 0
    _quiet_libraries()
    from trb.loading import resolve_device, set_threads
    from trb.miniature import prepare

    set_threads(args.threads)  # prepare's data line says how many
    report = prepare(args.source, Path(args.out), config, device=str(resolve_device(args.device)), log=_log,
                     teacher_from=args.teacher_from, teacher_more_steps=args.teacher_more_steps or 0,
                     student_from=args.student_from, overwrite=args.overwrite)
    if report["status"] == "stopped":
        print(json.dumps(report))
        return EXIT_PREEMPTED
    print(_prepare_summary(args.out, report, report["status"]))
    return 0


def cmd_demo(args) -> int:
    if args.out is not None:
        _writable_folder(args.out, "--out")
    from trb.demo import check_demo, run_demo

    check_demo(args.setting, args.steps, args.overrides)  # a bad value fails before the heavy imports
    _quiet_libraries()

    run_demo(Path(args.out) if args.out else None, setting=args.setting, steps=args.steps, overrides=args.overrides)
    return 0


def cmd_compare(args) -> int:
    if not args.config.startswith("trb:") and not Path(args.config).is_file():
        raise UsageError(f"config file {args.config!r} not found")
    _writable_folder(args.out, "--out")
    # key=value overrides may follow the methods (--methods opd trb steps=100): a method spec is name or
    # name:key=value, so an item whose "=" comes before any ":" is an override
    overrides = [m for m in args.methods if "=" in m.partition(":")[0]]
    args.methods = [m for m in args.methods if m not in overrides]
    args.overrides = [*overrides, *args.overrides]
    if not args.methods:
        raise UsageError("--methods names no method (key=value items are overrides)")
    from trb.config import check_variants

    check_variants(args.config, args.methods, args.overrides, Path(args.out))  # bad values fail before the imports
    _quiet_libraries()
    from trb.compare import run_compare

    run_compare(args.config, args.methods, args.seeds, Path(args.out), args.jobs, args.overrides,
                baseline=args.baseline, log=print, threads=args.threads, until_step=args.until_step)
    print(f"results: {Path(args.out) / 'results.md'}")
    return 0


def cmd_probe(args) -> int:
    preflight.model_path(args.student, "--student")
    preflight.model_path(args.teacher, "--teacher")
    preflight.problem_source(args.data, "--data")
    _writable_folder(args.out, "--out")
    _quiet_libraries()
    import torch

    from trb.models import load_causal_lm, load_tokenizer, vocab_space
    from trb.probe import continuation_probe, probe_tables
    from trb.tasks import problem_splits
    from trb.loading import resolve_device

    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.student)
    student, teacher = load_causal_lm(args.student, device), load_causal_lm(args.teacher, device)
    vocab = vocab_space(tokenizer, load_tokenizer(args.teacher), student, teacher)
    problems, _ = problem_splits(args.data, args.problems, 1, args.data_seed)  # step-0 prompts: training problems
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        rows = continuation_probe(student, teacher, tokenizer, vocab, problems, eps=args.eps, lengths=args.lengths,
                                  samples=args.samples, max_new_tokens=args.max_new_tokens, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps({"title": f"continuation probe ({args.data})", "rows": rows}) + "\n")
    print(probe_tables(out))
    return 0


def cmd_tables(args) -> int:
    for folder in map(Path, args.folders):  # every folder checked before the heavy imports
        if not (folder / "plan.json").is_file() and not (folder / "probe.json").is_file():
            raise TrbError(f"{str(folder)!r} holds neither plan.json (trb compare) nor probe.json (trb probe)")
    from trb.compare import read_plan, rebuild_results
    from trb.probe import probe_tables

    for folder in map(Path, args.folders):
        if (folder / "plan.json").is_file():
            if args.finished_seeds and not read_plan(folder)[2]:  # a part of a study that has only begun
                print(f"skipped {folder}: no seed is finished by every variant yet")
                continue
            rebuild_results(folder, finished_seeds=args.finished_seeds)
        else:
            probe_tables(folder)
        print(f"rebuilt {folder}")
    return 0


def cmd_inspect(args) -> int:
    if not (Path(args.run) / "metrics.jsonl").is_file() and not (Path(args.run) / "rollouts").is_dir():
        raise UsageError(f"{args.run!r} is not a run folder (no metrics.jsonl or rollouts/)")
    if args.out:
        _writable_folder(str(Path(args.out).parent), "--out's folder")
    from trb.viewer import write_page

    page = write_page(Path(args.run), Path(args.out) if args.out else None, args.steps)
    print(f"wrote {page}")
    return 0


THREADS_HELP = ("torch CPU threads (default: OMP_NUM_THREADS if set, else the cores other work leaves idle, "
                "measured over 0.3 s at start, at least 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="trb", description="On-policy distillation with Trust-Region behavior Blending.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a student (resume with resume=true)")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.eps0=0.01 steps=100")
    p.add_argument("--dry-run", action="store_true",
                   help="load and check models, tokenizers and data, run one tiny step; write nothing to out_dir")
    p.add_argument("--threads", type=_positive, help=THREADS_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="avg@n pass@1 at temperature 1.0 of a checkpoint")
    p.add_argument("--model", required=True,
                   help="student checkpoint folder, a training run folder or its checkpoints/latest (the latest "
                   "checkpoint), or trb:miniature/<setting>/student")
    p.add_argument("--teacher", help="teacher checkpoint folder: also report the teacher-KL on the samples")
    p.add_argument("--data", default="arith", help="a built-in setting or a problem file (JSONL/parquet)")
    p.add_argument("--all", action="store_true", help="score every problem of the --data file (your test file)")
    p.add_argument("--problems", type=_positive, default=200,
                   help="number of test problems (without --all: a setting's test split, or a held-out slice of a "
                   "file)")
    p.add_argument("--n", type=_positive, default=4, help="samples per problem (avg@n)")
    p.add_argument("--max-new-tokens", type=_positive, default=128)
    p.add_argument("--batch", type=_positive, default=256)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--data-seed", type=int, default=0, help="problem generation / split seed")
    p.add_argument("--system-prompt")
    p.add_argument("--device", type=_device, default="auto")
    p.add_argument("--out", help="write the full result (with per-problem scores) to this JSON file")
    p.add_argument("--threads", type=_positive, help=THREADS_HELP)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "prepare", help="make a miniature teacher and base student",
        description="Train a tokenizer, a teacher and a weak base student on a setting or on your problems. A progress "
        "bar shows each stage's steps and the time left. Ctrl-C (SIGINT) or SIGTERM stops after the current step, "
        "keeps the models trained so far in OUT/teacher and OUT/student and exits with code 75; rerunning the same "
        "command continues exactly where it stopped.")
    p.add_argument("source", help=f"a setting ({', '.join(SETTINGS)}) or a GSM8K-format JSONL of problems with "
                   "worked solutions")
    p.add_argument("--out", required=True, help="output folder (teacher/, student/, prepare.json)")
    p.add_argument("--preset", choices=SETTINGS,
                   help="model sizes and SFT budgets: arith (teacher 1,800 steps, student 1,500) or word (teacher "
                   "2,000 steps, student 3,000); default: the setting's own, word for a file")
    p.add_argument("--teacher-steps", type=_positive, help="the teacher's SFT steps (default: the preset's)")
    p.add_argument("--student-steps", type=_positive, help="the student's SFT steps (default: the preset's)")
    p.add_argument("--threads", type=_positive, help=THREADS_HELP)
    p.add_argument("--overwrite", action="store_true",
                   help="make the pair again even though --out holds a finished pair (or a stopped run) of it, and "
                   "replace it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-from", help="reuse the teacher (and tokenizer) of an earlier run: its teacher/ folder, "
                   "or trb:miniature/<setting>/teacher")
    p.add_argument("--teacher-more-steps", type=_positive,
                   help="train the reused teacher this many more steps on SOURCE (half the preset's lr, cosine)")
    p.add_argument("--student-from", help="reuse the student of an earlier run (same tokenizer): its student/ folder")
    p.add_argument("--device", type=_device, default="cpu")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("compare", help="methods x seeds with confidence intervals and paired differences")
    p.add_argument("config", help="YAML config shared by every run")
    p.add_argument("--methods", nargs="+", required=True,
                   help="method specs: name or name:key=value,... ; a|b in a value expands into a grid")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--out", required=True, help="output folder (runs/, results.md, results.csv, plots)")
    p.add_argument("--jobs", type=_positive, default=1, help="runs in parallel (threads are split among them)")
    p.add_argument("--threads", type=_positive, help="torch threads per run (default: cores // jobs)")
    p.add_argument("--baseline", default="opd", help="variant the paired differences are taken against")
    p.add_argument("--until-step", type=_positive, metavar="N",
                   help="score every run on its evaluations up to step N (runs of a longer study, linked beside "
                        "runs of steps=N, as if they had stopped there)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("probe", help="the continuation probe: step-0 prefixes of OPD and TRB, continued")
    p.add_argument("--student", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--data", default="arith")
    p.add_argument("--eps", type=_budget, default=0.02, help="TRB's step-0 budget eps0")
    p.add_argument("--lengths", type=_non_negative, nargs="+", default=[0, 4, 8, 16, 24, 32])
    p.add_argument("--problems", type=_positive, default=200)
    p.add_argument("--samples", type=_positive, default=2, help="rollouts per problem and behavior")
    p.add_argument("--max-new-tokens", type=_positive, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--device", type=_device, default="auto")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("tables", help="rebuild the tables and plots of compare / probe folders from their data")
    p.add_argument("folders", nargs="+", help="trb compare --out folders (plan.json + runs) or trb probe --out folders")
    p.add_argument("--finished-seeds", action="store_true",
                   help="a study still running: tables from the seeds every variant has finished (the title says so)")
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser("inspect", help="an HTML page of a run's logged rollouts, shaded by beta")
    p.add_argument("run", help="run folder")
    p.add_argument("--steps", type=_non_negative, nargs="*", help="steps to show (default: all logged)")
    p.add_argument("--out", help="HTML file (default: RUN/rollouts.html)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="the embedded miniature: vanilla OPD and TRB side by side")
    p.add_argument("--out", help="output folder (default: runs/demo-<time>)")
    p.add_argument("--setting", default="arith", choices=SETTINGS)
    p.add_argument("--steps", type=_positive, help="optimizer steps per method (default: the config's)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
    p.set_defaults(func=cmd_demo)
    return parser


def _at_least(lowest: int | float, what: str):
    """An argparse type: a number of lowest's type (int or float), finite and >= lowest; `what` names it in errors."""
    def parse(text: str):
        try:
            value = type(lowest)(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < lowest:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive = _at_least(1, "a positive integer")
_non_negative = _at_least(0, "an integer >= 0")
_budget = _at_least(0.0, "a finite number >= 0")


def _device(text: str) -> str:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", text) is None:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow options (trb train CONFIG --dry-run steps=3)
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # OpenMP's idle threads sleep instead of spinning (unless the environment says otherwise): read when torch loads,
    # so set before any subcommand imports it, and inherited by the runs `trb compare` and `trb demo` start. On a
    # busy 2-core machine a waiting thread spun while the one it waited for was off its core, and a training step
    # with torch's default two threads took 9 times as long as with one (benchmarks/bench_threads.py, docs/cli.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # train: SIGTERM/SIGINT handled before the heavy imports, so a signal at any moment gets a clean exit
    args.signals = StopSignals().install() if args.command == "train" else None
    try:
        return args.func(args)
    except TrbError as error:
        if args.debug:
            raise
        print(f"trb: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:  # an I/O error no check above names (run files name themselves through TrbError)
        if args.debug:
            raise
        where = f" ({error.filename})" if error.filename else ""
        print(f"trb: error: {error.strerror or error}{where}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Stopped as stop:  # raised only while loading, before any checkpoint could exist
        print(f"trb: stopped by signal {stop} before training started; no checkpoint was written: rerun the same "
              "command (with resume=auto if the run folder was created)", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("trb: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if args.signals is not None:
            args.signals.uninstall()


if __name__ == "__main__":
    sys.exit(main())
