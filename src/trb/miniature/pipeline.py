"""`trb prepare`: the tokenizer, the teacher and the student of a miniature pair, from a setting or a problem file.

The stages run in order (data and tokenizer; the teacher's SFT; the student's SFT with its validation curve; saving
and testing what ships), each a method of `Preparation`, which holds what the stages share: the data, the wall
times, the warnings, and the stages a stopped run already finished (`trb.miniature.storage`).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, PreTrainedModel

from trb.evaluate import EvalResult, evaluate
from trb.miniature.config import (REPORT, RESUME, PrepareConfig, PrepareError, SFTConfig, differences, finished_pair,
                                  prepare_settings)
from trb.miniature.sft import sft
from trb.miniature.storage import (earlier_run, load_stage, new_model, parameters, prepared_folder, reuse,
                                   save_and_reload, save_stage, size_of)
from trb.models import vocab_space
from trb.stopping import StopSignals
from trb.tasks import SETTINGS, Problem, load_problems, tokenize_prompts, train_tokenizer
from trb.tasks.tokenizer import PROMPT_FORMAT

ROLES = ("teacher", "student")


def split_problems(source: str, config: PrepareConfig) -> dict[str, list[Problem]]:
    """train / val / test problems of a synthetic setting or a problem file.

    Setting: train and val are disjoint draws of the train split, test of the (hash-disjoint) test split. File: the
    distinct questions ordered by a hash of their text (independent of file order and seed), then test, val and train
    are consecutive slices, so the same file always splits the same way.
    """
    if source in SETTINGS:
        drawn = SETTINGS[source]("train", config.num_val + config.num_train, config.seed)
        return {
            "train": drawn[config.num_val :],
            "val": drawn[: config.num_val],
            "test": SETTINGS[source]("test", config.num_test, config.seed),
        }
    path = Path(source)
    if not path.is_file():
        raise PrepareError(f"source must be a setting ({', '.join(SETTINGS)}) or a problem file; {source!r} is neither")
    unique = {p.question: p for p in load_problems(path)}  # a repeated question would straddle two splits
    ordered = sorted(unique.values(), key=lambda p: hashlib.sha256(p.question.encode()).digest())
    n_heldout = config.num_test + config.num_val
    if len(ordered) <= n_heldout:
        raise PrepareError(
            f"{path} has {len(ordered)} distinct problems, not enough for num_test = {config.num_test} + "
            f"num_val = {config.num_val} + at least one train problem; lower num_test / num_val"
        )
    return {
        "train": ordered[n_heldout : n_heldout + config.num_train],
        "val": ordered[config.num_test : n_heldout],
        "test": ordered[: config.num_test],
    }


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


class Preparation:
    """One `prepare` run: its arguments, the stages a stopped run finished, the data, wall times and warnings."""

    def __init__(self, source: str, out_dir: Path, config: PrepareConfig, device: torch.device,
                 log: Callable[[str], None], teacher_from: str | Path | None, teacher_more_steps: int,
                 student_from: str | Path | None):
        self.source, self.out_dir, self.config, self.device, self.log = source, out_dir, config, device, log
        self.teacher_from, self.teacher_more_steps, self.student_from = teacher_from, teacher_more_steps, student_from
        self.resume_dir = out_dir / RESUME
        self.stages: dict[str, tuple] = {}  # role -> (model, tokenizer, stage.json) of a stopped run's stages
        self.wall: dict[str, float] = {}
        self.warnings: list[str] = []
        self.earlier_runs: dict[str, dict | None] = {}
        # what the run was asked to do, before load_data resolves teacher_from: what a rerun is compared with
        self.settings = prepare_settings(source, config, teacher_from, teacher_more_steps, student_from)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.log(f"WARNING: {message}")

    def continue_stopped(self) -> None:
        """Load the stages of a stopped run in out_dir, which must have been asked for the same settings."""
        if not (self.resume_dir / "settings.json").is_file():
            return
        saved = json.loads((self.resume_dir / "settings.json").read_text())
        changed = differences(saved, self.settings)
        if changed:
            raise PrepareError(f"{self.out_dir} holds a stopped prepare run with other settings "
                               f"({', '.join(changed)}); rerun it with its own options to continue it, choose another "
                               "output folder, or pass --overwrite to start over")
        self.stages = {role: load_stage(self.resume_dir / role, self.device) for role in ROLES
                       if (self.resume_dir / role / "stage.json").is_file()}
        self.log(f"continuing the stopped run in {self.out_dir}: " + ", ".join(
            f"{role} {'finished' if state['done'] else 'at step ' + str(state['steps'])}"
            for role, (_, _, state) in self.stages.items()) if self.stages
            else f"continuing the stopped run in {self.out_dir}")

    def load_data(self) -> None:
        """The splits, the tokenizer (trained here, the stopped run's, or the reused teacher's), the train prompts and
        completions (solution + EOS) in tokens, and the models' context."""
        config, t0 = self.config, time.perf_counter()
        self.splits = split_problems(self.source, config)
        train = self.splits["train"]
        if self.stages:  # the stopped run's tokenizer
            self.tokenizer = next(iter(self.stages.values()))[1]
        elif self.teacher_from is None:
            self.tokenizer = train_tokenizer([PROMPT_FORMAT.format(question=p.question) + p.solution for p in train],
                                             config.vocab_size)
        else:
            self.teacher_from = prepared_folder(self.teacher_from, "teacher")
            self.tokenizer = AutoTokenizer.from_pretrained(self.teacher_from)
        tokenizer = self.tokenizer
        self.vocab = vocab_space(tokenizer)
        self.prompts = tokenize_prompts(tokenizer, [p.question for p in train])
        solutions = tokenizer([p.solution for p in train], add_special_tokens=False)["input_ids"]
        self.completions = [s + [tokenizer.eos_token_id] for s in solutions]
        longest = max(len(c) for c in self.completions)
        if longest > config.max_new_tokens:
            n_long = sum(len(c) > config.max_new_tokens for c in self.completions)
            self.warn(f"{n_long} of {len(train)} train solutions exceed max_new_tokens = {config.max_new_tokens} "
                      f"(longest {longest} tokens); evaluation truncates such answers")
        self.max_positions = max(512, max(map(len, self.prompts)) + max(longest, config.max_new_tokens))
        self.wall["data"] = time.perf_counter() - t0
        mean_tokens = sum(len(p) + len(c) for p, c in zip(self.prompts, self.completions)) / len(train)
        self.log(f"data: {len(train)} train / {len(self.splits['val'])} val / {len(self.splits['test'])} test "
                 f"problems, vocabulary {len(tokenizer)}, {mean_tokens:.1f} tokens per sequence; "
                 f"{torch.get_num_threads()} torch thread(s)")

    def score(self, model: PreTrainedModel, problems: list[Problem], seed: int) -> EvalResult:
        return evaluate(model, self.tokenizer, problems, vocab_space(self.tokenizer, student=model),
                        n_samples=self.config.eval_samples, max_new_tokens=self.config.max_new_tokens, seed=seed)

    def train(self, role: str, model: PreTrainedModel, sft_config: SFTConfig, seed: int, extra=lambda: {},
              **stopping) -> dict:
        """SFT of one stage (continued from its saved state when the stopped run got that far); when it ends or is
        stopped the stage is saved under out_dir/.resume and the model to out_dir/<role>. SIGINT / SIGTERM end it
        after the current step."""
        earlier = self.stages.get(role, (None, None, {"done": False, "wall_s": 0.0}))[2]
        if earlier["done"]:
            self.log(f"{role}: finished before the stop ({earlier['steps']} steps)")
            self.wall[f"{role}_sft"] = earlier["wall_s"]
            return {"steps": earlier["steps"], "final_loss": earlier["final_loss"], "stopped": False}
        self.log(f"{role}: {parameters(model):,} parameters")
        t = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)  # data order; init is isolated by tiny_causal_lm(seed=)
        signals = StopSignals().install()
        try:
            with signals.phase(abandon=False):
                result = sft(model, self.prompts, self.completions, self.vocab, sft_config, generator, self.log,
                             role, resume=earlier.get("resume"), interrupted=lambda: signals.received is not None,
                             **stopping)
        finally:
            signals.uninstall()
        self.wall[f"{role}_sft"] = earlier["wall_s"] + time.perf_counter() - t
        save_stage(self.resume_dir / role, model, self.tokenizer, result,
                   {"wall_s": self.wall[f"{role}_sft"], **extra()})
        save_and_reload(model, self.tokenizer, self.out_dir / role, self.config.save_dtype, self.device)  # usable now
        return result

    def stopped(self, role: str, result: dict) -> dict:
        self.log(f"stopped at {role} step {result['steps']}: the {role} so far is in {self.out_dir / role}; rerun the "
                 "same command to continue")
        return {"status": "stopped", "stage": role, "step": result["steps"], "out": str(self.out_dir),
                "models": {r: str(self.out_dir / r) for r in ROLES if (self.out_dir / r).is_dir()}}

    def teacher(self) -> tuple[PreTrainedModel, dict]:
        """The teacher and its SFT result: the full budget, cosine to 0, or an earlier run's teacher, optionally
        trained further (teacher_more_steps: warmup, then cosine from half the preset's lr)."""
        config, teacher = self.config, None
        if "teacher" in self.stages:
            teacher = self.stages["teacher"][0]
            if self.teacher_from is not None:
                self.earlier_runs["teacher"] = earlier_run(prepared_folder(self.teacher_from, "teacher"), "teacher")
        if self.teacher_from is None:
            if teacher is None:
                teacher = new_model(config.teacher, self.tokenizer, self.max_positions, config.seed, self.device)
            return teacher, self.train("teacher", teacher, config.teacher_sft, config.seed)
        if teacher is None:
            teacher, self.earlier_runs["teacher"] = reuse(self.teacher_from, "teacher", self.device, self.log)
        if self.teacher_more_steps <= 0:
            return teacher, {"steps": 0, "final_loss": math.nan, "stopped": False}
        more = replace(config.teacher_sft, steps=self.teacher_more_steps, lr=config.teacher_sft.lr / 2,
                       warmup=min(50, self.teacher_more_steps - 1))
        return teacher, self.train("teacher", teacher, more, config.seed + 2)

    def student(self) -> tuple[PreTrainedModel, dict, list[tuple[int, float]]]:
        """The student, its SFT result and its validation curve [(step, pass@1)]: label-smoothed SFT with the
        validation pass@1 recorded every eval_every steps (and, with student_early_stop, stopped the first time it
        reaches the window), or an earlier run's student, evaluated; a warning when it ends outside the window."""
        config, (lo, hi) = self.config, self.config.student_window
        curve: list[tuple[int, float]] = []
        if "student" in self.stages:
            student = self.stages["student"][0]
            curve += [tuple(point) for point in self.stages["student"][2]["validation_curve"]]
        elif self.student_from is None:
            student = new_model(config.student, self.tokenizer, self.max_positions, config.seed + 1, self.device)
        else:
            student, self.earlier_runs["student"] = reuse(self.student_from, "student", self.device, self.log)

        def validate(step: int) -> bool:
            pass_at_1 = self.score(student, self.splits["val"], seed=config.seed).pass_at_1
            curve.append((step, pass_at_1))
            self.log(f"student step {step}: validation pass@1 {pass_at_1:.3f} (window {lo:.2f}-{hi:.2f})")
            return config.student_early_stop and pass_at_1 >= lo

        if self.student_from is None:
            result = self.train("student", student, config.student_sft, config.seed + 1, stop=validate,
                                stop_every=config.eval_every, extra=lambda: {"validation_curve": curve})
            if result["stopped"]:
                return student, result, curve
        else:
            result = {"steps": 0, "final_loss": math.nan, "stopped": False}
        if not curve or curve[-1][0] != result["steps"]:
            validate(result["steps"])
        last = curve[-1][1]
        if last < lo:
            self.warn(f"the student ends below the window: validation pass@1 {last:.3f} < {lo:.2f} after "
                      f"{result['steps']} steps; train longer, raise student_sft.lr or lower label_smoothing")
        elif last > hi:
            self.warn(f"the student ends above the window: validation pass@1 {last:.3f} > {hi:.2f} after "
                      f"{result['steps']} steps; raise label_smoothing (or stop early)")
        return student, result, curve

    def ship(self, role: str, model: PreTrainedModel, result: dict) -> dict:
        """Save the model as it ships, load it back, and test it; its report entry."""
        config, test_problems, t = self.config, self.splits["test"], time.perf_counter()
        shipped = save_and_reload(model, self.tokenizer, self.out_dir / role, config.save_dtype, self.device)
        scored = self.score(shipped, test_problems, seed=config.seed)
        self.log(f"{role}: test pass@1 {scored.pass_at_1:.3f} (avg@{scored.n_samples}, {len(test_problems)} problems, "
                 f"mean length {scored.mean_length:.1f}, truncated {scored.truncation_rate:.3f})")
        test = {**scored.as_dict(), "n_problems": len(test_problems)}
        if config.save_dtype != "float32":  # storage rounding must not cost accuracy: compare with the fp32 weights
            test["pass_at_1_fp32_weights"] = self.score(model, test_problems, seed=config.seed).pass_at_1
            self.log(f"{role}: test pass@1 {test['pass_at_1_fp32_weights']:.3f} with the fp32 weights before saving")
        self.wall[f"{role}_eval"] = time.perf_counter() - t
        return {"parameters": parameters(model), "size": size_of(model), "sft_steps": result["steps"],
                "final_train_loss": result["final_loss"], "test": test, "examples": scored.examples}

    def report(self, models: dict[str, dict], curve: list[tuple[int, float]]) -> dict:
        """The run's report (prepare.json): the models' entries, the data, wall times, warnings, versions, hardware."""
        config, (lo, hi) = self.config, self.config.student_window
        teacher_pass = models["teacher"]["test"]["pass_at_1"]
        models["teacher"]["meets_target"] = teacher_pass >= config.teacher_target
        if teacher_pass < config.teacher_target:
            self.warn(f"THE TEACHER MISSES ITS TARGET: test pass@1 {teacher_pass:.3f} < {config.teacher_target:.2f}; "
                      "do not ship it: train longer or larger (teacher_sft.steps, teacher size)")
        for role, folder in (("teacher", self.teacher_from), ("student", self.student_from)):
            if folder is not None:
                models[role]["reused_from"] = str(folder)
                models[role]["earlier_run"] = self.earlier_runs[role]
        if self.teacher_more_steps > 0:
            models["teacher"]["more_sft_steps"] = self.teacher_more_steps
        models["student"]["validation_curve"] = curve
        models["student"]["in_window"] = lo <= curve[-1][1] <= hi
        return {
            "status": "completed",
            "settings": self.settings,
            "source": self.source,
            "config": asdict(config),
            "data": {name: len(problems) for name, problems in self.splits.items()}
            | {"vocab_size": len(self.tokenizer)},
            **models,
            "parameter_ratio": models["teacher"]["parameters"] / models["student"]["parameters"],
            "wall_s": self.wall | {"total": sum(self.wall.values())},
            "warnings": self.warnings,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "hardware": {"device": str(self.device), "processor": platform.processor(), "cpu": cpu_name(),
                         "threads": torch.get_num_threads()},
        }


def prepare(
    source: str, out_dir: str | Path, config: PrepareConfig, device: str = "cpu", log: Callable[[str], None] = print,
    teacher_from: str | Path | None = None,
    teacher_more_steps: int = 0,
    student_from: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Train the tokenizer, teacher and student for `source` (a setting name or a problem file), save them under
    out_dir/{teacher,student}, and write out_dir/prepare.json (the returned report).

    teacher_from: the teacher/ folder of an earlier run on the same source; its tokenizer and teacher are reused (and
    its run's report entry for the teacher is carried over when that run's prepare.json exists).
    teacher_more_steps: continue the reused teacher's SFT for this many steps (warmup, then cosine from half the
    preset's lr), e.g. when it misses its target. student_from: likewise reuse an earlier run's student (evaluated,
    not trained).

    SIGINT / SIGTERM during SFT stop the run after the current step: the model trained so far is saved as a loadable
    checkpoint in out_dir/<role> (in save_dtype; with a finished teacher, both), its exact training state in
    out_dir/.resume, and the report {"status": "stopped", ...} is returned. Calling prepare again with the same
    arguments continues from there and gives the same models as an uninterrupted run; other arguments are refused.

    A finished pair in out_dir is never replaced unless overwrite: made with the same arguments, prepare logs that
    it is done and returns its report; made with others, it is refused (PrepareError) and nothing is touched. With
    overwrite, a finished pair or a stopped run in out_dir is discarded and the pair made again.
    """
    out_dir, device = Path(out_dir), torch.device(device)
    if (teacher_more_steps or student_from is not None) and teacher_from is None:
        raise PrepareError("teacher_more_steps and student_from need teacher_from (the tokenizer comes with it)")
    run = Preparation(source, out_dir, config, device, log, teacher_from, teacher_more_steps, student_from)
    done = finished_pair(out_dir, run.settings, overwrite)
    if done is not None:
        log(f"{out_dir} holds the finished pair of these settings ({REPORT}); nothing to do")
        return done
    if not overwrite:
        run.continue_stopped()
    run.load_data()
    if not run.stages:  # the data are good: from here on a stopped run can be continued
        if overwrite:  # what the folder held describes other models from here on
            shutil.rmtree(run.resume_dir, ignore_errors=True)
            (out_dir / REPORT).unlink(missing_ok=True)
        run.resume_dir.mkdir(parents=True, exist_ok=True)
        (run.resume_dir / "settings.json").write_text(json.dumps(run.settings, indent=1))
    teacher, teacher_sft = run.teacher()
    if teacher_sft["stopped"]:
        return run.stopped("teacher", teacher_sft)
    student, student_sft, curve = run.student()
    if student_sft["stopped"]:
        return run.stopped("student", student_sft)
    models = {role: run.ship(role, model, result)
              for role, model, result in (("teacher", teacher, teacher_sft), ("student", student, student_sft))}
    report = run.report(models, curve)
    (out_dir / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(run.resume_dir)
    return report
