"""The training loop: on-policy distillation with the method's behavior policy at every step.

One step, top to bottom:
  1. take the step's prompts (a seeded permutation per epoch), `rollouts_per_prompt` copies each;
  2. sample rollouts from the behavior policy the method gives for this step (student, TRB blend, ...);
  3. loss = per-token divergence of the student from the target at every completion position, weighted by
     1 / (completion tokens in the whole step), accumulated over micro-batches;
  4. clip, AdamW step, lr schedule; log; evaluate and checkpoint on schedule.
Every random draw comes from a generator seeded by (seed, step, stream), so a resumed run is the uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm import tqdm

from trb import distributed
from trb.checkpoint import latest_checkpoint, read_checkpoint, save_checkpoint
from trb.config import ConfigError, TrainConfig
from trb.core import step_prompts, stream_seed
from trb.errors import TrbError
from trb.evaluate import evaluate, merge_results
from trb.loading import Setup, set_threads, setup
from trb.losses import distill_loss
from trb.models import merged_lora_model
from trb.records import write_record
from trb.report import write_run_report
from trb.run_folder import MetricsLog, RunDir, save_rollouts, write_atomic
from trb.sequences import Rollout, rollout_from_tokens
from trb.stopping import Stopped, StopSignals
from trb.trainer import Trainer


PROGRESS_S = 30  # seconds between the progress lines of a run whose stderr is not a terminal (no progress bar)


class NumericalError(TrbError):
    """Training produced a non-finite loss or gradient; the run stopped without applying it."""


@dataclass
class LoopState:
    """What the loop carries from step to step beside the models and the optimizer: exactly what a checkpoint's
    state.json holds next to the weights, the optimizer and the lr schedule."""

    next_step: int = 0  # optimizer steps done
    metric_lines: int = 0  # lines of metrics.jsonl they wrote
    method_state: dict = field(default_factory=dict)  # the method's feedback (`Method.observe`), JSON-able
    data_position: int = 0  # prompts consumed: next_step x prompts_per_step
    seed: int = 0
    last_eval: dict = field(default_factory=dict)  # the newest evaluation: {"step", "values"}

    @classmethod
    def from_record(cls, record: dict) -> LoopState:
        """The state of a checkpoint's state.json (which also holds the scheduler's; older ones no last_eval)."""
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})


class Run:
    """A training run in progress: its trainer, loop state and metrics log, evaluation and checkpoints. Built from a
    loaded Setup, resumed from the newest intact checkpoint when cfg.resume."""

    def __init__(self, cfg: TrainConfig, s: Setup, log, signals: StopSignals):
        self.cfg, self.s, self.signals, self.world = cfg, s, signals, s.world
        self.log = log if s.world.main else (lambda message: None)
        self.t = Trainer(cfg, s)
        self.state, self.resumed = LoopState(seed=cfg.seed), False
        self.saved: tuple | None = None  # (next step, step of its last evaluation) of the newest checkpoint
        self.metrics: MetricsLog | None = None
        self.last_line: float | None = None  # when `progress` last logged
        checkpoint = None
        if cfg.resume:
            checkpoint = latest_checkpoint(s.run.checkpoints, warn=lambda message: self.log(f"trb: warning: {message}"))
        if checkpoint is not None:
            model_state, optimizer_state, record = read_checkpoint(checkpoint, s.student)
            distributed.load_full_state(s.student, self.t.optimizer, model_state, optimizer_state)
            self.t.refresh()
            self.t.scheduler.load_state_dict(record["scheduler"])
            self.state, self.resumed = LoopState.from_record(record), True
            self.saved = (self.state.next_step, self.state.last_eval.get("step"))  # saving again adds nothing
            self.log(f"resumed {s.run.path} from {checkpoint.name} (next step {self.state.next_step})")

    def loop(self) -> str:
        """The steps from the state's next one to cfg.steps, with evaluations and checkpoints on schedule; returns
        "completed", or "preempted" when a signal stopped it (after saving what there is)."""
        cfg, method, state = self.cfg, self.cfg.method, self.state
        self.metrics = MetricsLog(self.s.run, state.metric_lines, state.next_step) if self.world.main else None
        status = "completed"
        bar = tqdm(range(state.next_step, cfg.steps), initial=state.next_step, total=cfg.steps, desc=method.name,
                   dynamic_ncols=True, disable=None if self.world.main else True)
        try:
            # step 0, or a resume from a checkpoint saved when a signal abandoned this evaluation
            if state.next_step < cfg.steps and self.eval_due(state.next_step):
                self.evaluate(state.next_step)
            if not self.resumed and method.before_training(self.t, self.write, self.log):
                self.save()
            for step in bar:
                if self.stop_requested():
                    status = "preempted"
                    break
                values = self.train_step(step)
                method.observe(step, values, state.method_state)
                self.write(step + 1, values)
                state.next_step = done = step + 1
                if bar.disable:  # no bar (stderr is not a terminal): a line now and then
                    self.progress(done, values)
                if done < cfg.steps and not self.stop_requested() and self.eval_due(done):
                    self.evaluate(done)
                bar.set_postfix(loss=f"{values['loss']:.4f}", pass1=f"{self.pass_at_1():.3f}")
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    self.save()
            bar.close()
            if status == "completed":
                self.evaluate(cfg.steps)
                self.save()
                if self.stop_requested():  # arrived during the final evaluation of data-parallel ranks or the save
                    status = "preempted"
        except Stopped:  # an evaluation abandoned
            status = "preempted"
        bar.close()
        if status == "preempted":
            if state.next_step > 0 or state.last_eval:  # (a no-op when the newest checkpoint holds this state)
                self.save()
            self.log(f"stopped by signal {self.signals.name} after step {state.next_step}; "
                     f"{'checkpoint saved' if self.saved is not None else 'nothing to save yet'}, resume with "
                     "resume=true")
        return status

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step: this rank's rollouts (or the dataset's solutions), the loss accumulated over
        micro-batches, the update; returns the step's metrics."""
        cfg, s, method = self.cfg, self.s, self.cfg.method
        started = time.perf_counter()
        s.student.eval()
        rollouts = self.rollouts(step)
        rollout_time = time.perf_counter() - started
        if method.reads_student_logp:  # the engine may not have recorded them (vLLM)
            rollouts = [self.t.fill_token_logp(r) for r in rollouts]
        if self.world.main and cfg.log_rollouts_every and step % cfg.log_rollouts_every == 0:
            logged = self.t.fill_token_logp(rollouts[0].select(slice(0, cfg.log_rollouts)), teacher=True)
            save_rollouts(s.run.path / "rollouts" / f"step_{step:08d}.json", step, logged, cfg.log_rollouts,
                          s.tokenizer, method.schedule_metrics(step, self.state.method_state))
        s.student.train()
        values = self.update(step, rollouts)
        values.update({
            "tokens_per_s": values["tokens"] / max(rollout_time, 1e-9),
            "time/rollout_s": rollout_time,
            "time/step_s": time.perf_counter() - started,
            **method.schedule_metrics(step, self.state.method_state),
            **rollout_stats(distributed.gather_objects(rollout_sums(rollouts), self.world)),
        })
        if self.t.engine.stats.tested:
            values["rollout/spec_acceptance"] = self.t.engine.stats.acceptance
        return values

    def rollouts(self, step: int) -> list[Rollout]:
        """This rank's sequences of the step: the behavior policy's rollouts of the step's prompts, or, on a step
        where the method trains on data (GKD's coin), the dataset's solutions of this rank's share of them."""
        cfg, s, method = self.cfg, self.s, self.cfg.method
        indices = step_prompts(step, cfg.prompts_per_step, len(s.prompts), cfg.seed)
        if method.use_data(step, torch.Generator().manual_seed(stream_seed(cfg.seed, step, "coin"))):
            mine = [indices[j] for j in self.t.my_sequences(len(indices))]
            return [rollout_from_tokens([s.prompts[i] for i in mine], [s.solutions[i] for i in mine], s.vocab,
                                        s.device)]
        sequences = [s.prompts[i] for i in indices for _ in range(cfg.rollouts_per_prompt)]
        return self.t.decode(step, method.behavior(step, self.state.method_state), sequences)

    def update(self, step: int, rollouts: list[Rollout]) -> dict[str, float]:
        """The step's loss and its gradient over micro-batches, then one optimizer step: returns the loss and the
        per-token diagnostics (sums over every rank's tokens), grad norm, lr and token count."""
        cfg, s, t, method = self.cfg, self.s, self.t, self.cfg.method
        num_tokens = distributed.all_reduce_sum(sum(int(r.completion_mask.sum()) for r in rollouts), self.world,
                                                s.device)
        spec, target = method.loss_spec(cfg.loss), method.target(step)
        sums = {"loss": 0.0}

        def loss_fn(micro: Rollout) -> torch.Tensor:
            weight = method.token_weights(micro) / max(num_tokens, 1)  # (b, T)
            loss, _, per_token = distill_loss(s.student, s.teacher, micro, s.vocab, spec, weight, target,
                                              student_hidden_fn=t.hidden, teacher_hidden_fn=t.teacher_hidden)
            sums["loss"] += loss.item()
            for name, per_token_values in per_token.items():
                share = (per_token_values * micro.completion_mask).sum().item() / max(num_tokens, 1)
                sums[name] = sums.get(name, 0.0) + share
            return loss

        t.optimizer.zero_grad(set_to_none=True)
        t.backward(t.micro_batches(rollouts), loss_fn)
        values = {name: distributed.all_reduce_sum(v, self.world, s.device) for name, v in sums.items()}
        grad_norm, lr = t.optimizer_step()
        if not (math.isfinite(values["loss"]) and math.isfinite(grad_norm)):
            raise NumericalError(
                f"non-finite {'loss' if not math.isfinite(values['loss']) else 'gradient'} at step {step}; nothing "
                f"was applied and the last good checkpoint is {latest_checkpoint(s.run.checkpoints) or 'none'}; "
                "lower lr or check the models"
            )
        return {**values, "grad_norm": grad_norm, "lr": lr, "tokens": num_tokens}

    def evaluate(self, step: int) -> bool:
        """The evaluation after `step` optimizer steps, unless the state holds it already; whether it ran: pass@1 on
        the test problems (metrics eval/*, files eval/step_*.json) and on the validation problems (val/*,
        eval/val_step_*.json; no teacher-KL), each from its own seeded stream. In one process a signal abandons it
        (Stopped); data-parallel ranks finish it, as they meet in collectives."""
        cfg, s = self.cfg, self.s
        if self.state.last_eval.get("step") == step:
            return False
        values, started = {}, time.perf_counter()
        self.log(f"step {step}: evaluating avg@{cfg.eval_samples} pass@1 on {len(s.test_problems)} test problems"
                 + (f" and {len(s.val_problems)} validation problems" if s.val_problems else ""))
        for prefix, problems in (("eval", s.test_problems), ("val", s.val_problems)):
            if not problems:
                continue
            mine = problems[self.world.rank :: self.world.size]
            with self.signals.phase(abandon=not self.world.active), s.autocast:
                result = evaluate(self.t.inference.model, s.tokenizer, mine, s.vocab, engine=self.t.engine,
                                  n_samples=cfg.eval_samples,
                                  max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch,
                                  seed=stream_seed(cfg.seed, prefix, step, self.world.rank),
                                  teacher=s.teacher if prefix == "eval" else None, system_prompt=cfg.data.system_prompt)
            result = merge_results(distributed.gather_objects(result, self.world))
            if self.world.main:
                (s.run.path / "eval").mkdir(exist_ok=True)
                name = f"step_{step:08d}.json" if prefix == "eval" else f"val_step_{step:08d}.json"
                write_atomic(s.run.path / "eval" / name,
                             json.dumps({"step": step, **result.as_dict(), "per_problem": result.per_problem,
                                         "examples": result.examples}, indent=1))
            values.update({f"{prefix}/{k}": v for k, v in result.as_dict().items() if v is not None})
        self.write(step, values)
        self.state.last_eval = {"step": step, "values": values}
        self.log(f"step {step}: pass@1 {self.pass_at_1():.3f}"
                 + (f", validation {values['val/pass_at_1']:.3f}" if "val/pass_at_1" in values else "")
                 + f" ({time.perf_counter() - started:.0f} s)")
        return True

    def save(self) -> None:
        """Checkpoint the state (a collective), unless the newest checkpoint holds it already."""
        cfg, s, state = self.cfg, self.s, self.state
        if self.saved == (state.next_step, state.last_eval.get("step")):
            return
        model_state, optimizer_state = distributed.full_state(s.student, self.t.optimizer)  # collective
        if self.world.main:
            state.metric_lines, state.data_position = self.metrics.lines, state.next_step * cfg.prompts_per_step
            save_checkpoint(s.run.checkpoints, state.next_step, s.student, s.tokenizer, model_state, optimizer_state,
                            self.t.scheduler, asdict(state), cfg.keep_checkpoints)
        distributed.barrier(self.world)
        self.saved = (state.next_step, state.last_eval.get("step"))

    def write(self, step: int, values: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(step, values)

    def progress(self, done: int, values: dict) -> None:
        """A line after the first step and then at most every PROGRESS_S seconds, where no progress bar shows."""
        if self.last_line is None or time.perf_counter() - self.last_line >= PROGRESS_S:
            self.last_line = time.perf_counter()
            self.log(f"step {done}/{self.cfg.steps}: loss {values['loss']:.4f}, {values['time/step_s']:.1f} s/step")

    def pass_at_1(self) -> float:
        return self.state.last_eval.get("values", {}).get("eval/pass_at_1", float("nan"))

    def eval_due(self, step: int) -> bool:
        return step in (0, self.cfg.steps) or bool(self.cfg.eval_every and step % self.cfg.eval_every == 0)

    def stop_requested(self) -> bool:
        return distributed.all_reduce_sum(float(self.signals.received is not None), self.world, self.s.device) > 0

    def finish(self, status: str) -> dict:
        """The run's summary; a completed run's summary.json, report and compact record, and its merged LoRA
        student."""
        cfg, s, run = self.cfg, self.s, self.s.run
        if status == "completed" and cfg.models.lora_rank:  # a plain checkpoint with the adapters merged in, for users
            merged = merged_lora_model(s.student)  # a collective under FSDP2
            if self.world.main:
                merged.save_pretrained(run.path / "merged")
                s.tokenizer.save_pretrained(run.path / "merged")
        if self.metrics is not None:
            self.metrics.close()
        summary = {"status": status, "run": str(run.path), "final": self.state.last_eval.get("values", {}),
                   "decoder": self.t.decoder,  # what decoded the student's rollouts
                   "hardware": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, "
                               f"{torch.get_num_threads()} torch thread(s)), {s.device}, {self.world.size} rank(s)",
                   "warnings": s.warnings}
        if status == "completed" and self.world.main:  # summary.json marks a finished run
            write_atomic(run.path / "summary.json", json.dumps(summary, indent=1))
            write_run_report(run.path, cfg.method.name, f"trb train: {cfg.method.name}", (
                f"Student {cfg.models.student}, teacher {cfg.models.teacher}, data {cfg.data.source}. Method "
                f"{json.dumps({'name': cfg.method.name, **vars(cfg.method)})}; {cfg.steps} steps of "
                f"{cfg.prompts_per_step} prompts x {cfg.rollouts_per_prompt} rollouts; avg@{cfg.eval_samples} pass@1 "
                f"at temperature 1.0 on {len(s.test_problems)} test problems (every {cfg.eval_every or cfg.steps} "
                f"steps). Final pass@1 {summary['final'].get('eval/pass_at_1', float('nan')):.3f}. Config: "
                f"config.yaml; every metric: metrics.jsonl. Hardware: {summary['hardware']}."))
            write_record(run.path, run.path / "record")
        distributed.shutdown(self.world)
        return summary


def rollout_sums(rollouts: list[Rollout]) -> dict[str, float]:
    """Sums over a rank's rollouts from which the step's behavior diagnostics are formed (see rollout_stats)."""
    mask = torch.cat([r.completion_mask.flatten() for r in rollouts])
    beta = torch.cat([r.beta.flatten() for r in rollouts])[mask]
    kl = torch.cat([r.realized_kl.flatten() for r in rollouts])[mask]
    return {
        "tokens": float(mask.sum()),
        "sequences": float(sum(len(r.stopped) for r in rollouts)),
        "beta": beta.sum().item(),
        "beta_one": (beta == 1).sum().item(),
        "kl": kl.sum().item(),
        "kl_max": kl.max().item() if len(kl) else 0.0,
        "from_teacher": torch.cat([r.from_teacher.flatten() for r in rollouts])[mask].sum().item(),
        "stopped": float(sum(int(r.stopped.sum()) for r in rollouts)),
    }


def rollout_stats(sums: list[dict[str, float]]) -> dict[str, float]:
    """Behavior diagnostics of a step (METHOD.md section 4) from every rank's sums, averaged over completion
    tokens: mean beta, fraction of beta = 1, realized KL(mu || pi_S) (mean and max), tokens from the teacher;
    per sequence: length and the fraction that stopped with EOS."""
    total = {key: sum(s[key] for s in sums) for key in sums[0]}
    tokens, sequences = max(total["tokens"], 1.0), max(total["sequences"], 1.0)
    return {
        "rollout/mean_beta": total["beta"] / tokens,
        "rollout/frac_beta_one": total["beta_one"] / tokens,
        "rollout/realized_kl": total["kl"] / tokens,
        "rollout/realized_kl_max": max(s["kl_max"] for s in sums),
        "rollout/from_teacher": total["from_teacher"] / tokens,
        "rollout/length": total["tokens"] / sequences,
        "rollout/stop_rate": total["stopped"] / sequences,
    }


def dry_run(cfg: TrainConfig, log=print, signals: StopSignals | None = None, threads: int | None = None) -> dict:
    """Validate a config end to end without writing to its out_dir: load and check the models, tokenizers and data
    as the real run would, then run one tiny optimizer step (one prompt, a few tokens, its checkpoint) in a temporary
    folder. Returns what was checked. An out_dir that already holds a run is not refused (nothing is written there):
    the report's "out_dir" says whether the real run could use it as given. threads: as `train`'s."""
    out_dir = "ok"
    if (Path(cfg.out_dir) / "config.yaml").exists():  # a run is there: the dry run leaves it alone and says so
        try:
            RunDir.check(cfg)
        except ConfigError as error:
            out_dir = f"not usable as given: {error}"
    else:
        RunDir.check(cfg)
    with tempfile.TemporaryDirectory(prefix="trb-dry-run-") as tmp:
        started = time.perf_counter()
        set_threads(threads)
        s = setup(replace(cfg, out_dir=tmp, resume=False), signals)
        s.test_problems, s.val_problems = s.test_problems[:1], s.val_problems[:1]
        world = s.world.size
        small = replace(cfg, out_dir=tmp, resume=False, steps=1, prompts_per_step=world, rollouts_per_prompt=1,
                        rollout_batch=1, micro_batch=1, max_new_tokens=min(cfg.max_new_tokens, 8), eval_every=0,
                        eval_samples=1, checkpoint_every=0, log_rollouts_every=0, keep_checkpoints=1)
        loaded = time.perf_counter()
        summary = train(small, log=lambda message: None, s=s, signals=signals)
        report = {
            "dry_run": "ok" if summary["status"] == "completed" else summary["status"],
            "student": cfg.models.student, "teacher": cfg.models.teacher,
            "vocab_size": s.vocab.size, "stop_ids": list(s.vocab.stop_ids), "eos_emitted": s.vocab.eos_id,
            "train_prompts": len(s.prompts), "longest_prompt_tokens": max(map(len, s.prompts)),
            "method": cfg.method.name, "ranks": world, "out_dir": out_dir, "decoder": summary["decoder"],
            "warnings": s.warnings, "torch_threads": torch.get_num_threads(),
            "load_s": round(loaded - started, 1), "step_s": round(time.perf_counter() - loaded, 1),
        }
    log(f"dry run ok: {report}")
    return report


def train(cfg: TrainConfig, log=print, s: Setup | None = None, signals: StopSignals | None = None,
          threads: int | None = None) -> dict:
    """Run (or resume) a training run; returns a summary with the final evaluation. s: an already loaded Setup (the
    process's torch threads stay as they are). signals: the process's SIGTERM/SIGINT handler (`trb train` installs one
    at start); without one, train installs its own for the call when it runs in the main thread. A signal while
    loading raises `Stopped`. threads: torch's CPU threads (`trb.loading.set_threads`: by default OMP_NUM_THREADS or
    the cores other work leaves idle)."""
    own = signals is None
    signals = signals or StopSignals()
    if own and threading.current_thread() is threading.main_thread():
        signals.install()
    try:
        loaded = None  # what the run says once it is ready to start
        with signals.phase(abandon=True):
            if s is None:
                chosen, started = set_threads(threads), time.perf_counter()
                s = setup(cfg, signals)
                loaded = (f"loaded the student, the teacher and {len(s.prompts):,} training prompts in "
                          f"{time.perf_counter() - started:.0f} s; {chosen}")
        with signals.phase(abandon=False):
            return _train(cfg, log, s, signals, loaded)
    finally:
        if s is not None:
            s.run.unlock()
        if own:
            signals.uninstall()


def _train(cfg: TrainConfig, log, s: Setup, signals: StopSignals, loaded: str | None) -> dict:
    run = Run(cfg, s, log, signals)
    try:
        if run.state.next_step >= cfg.steps and (s.run.path / "summary.json").exists():
            run.log(f"{s.run.path} already completed {cfg.steps} steps")
            return json.loads((s.run.path / "summary.json").read_text())
        if run.state.next_step > cfg.steps:
            raise ConfigError(f"the run in {str(s.run.path)!r} has done {run.state.next_step} steps, more than "
                              f"steps={cfg.steps}")
        for line in ([loaded] if loaded else []) + [f"trb: warning: {warning}" for warning in s.warnings]:
            run.log(line)  # once nothing but the run itself can fail: a refused run says one line
        return run.finish(run.loop())
    finally:
        run.t.engine.close()  # vLLM's engine and memory (one vLLM engine per process)
