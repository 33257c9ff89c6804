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

import hashlib
import json
import math
import os
import platform
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from trb.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from trb.config import ConfigError, TrainConfig, as_dict, load_config, save_config
from trb.core import linear_ramp
from trb.errors import TrbError
from trb.evaluate import evaluate
from trb.losses import distill_loss, sft_loss
from trb.methods import SFTWarmup
from trb.models import load_causal_lm, load_tokenizer, vocab_space
from trb.rollout import Rollout, TeacherPolicy, generate, rollout_from_tokens
from trb.tasks import problem_splits, tokenize_prompts


class NumericalError(TrbError):
    """Training produced a non-finite loss or gradient; the run stopped without applying it."""


def stream_seed(*parts) -> int:
    """A 63-bit seed from (seed, step, rank, stream name, ...): independent streams, reproducible anywhere."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use device=cpu")
    return torch.device(name)


def step_prompts(step: int, per_step: int, num_prompts: int, seed: int) -> list[int]:
    """Indices of the prompts of optimizer step `step`: consecutive slices of a seeded permutation per epoch."""
    orders: dict[int, torch.Tensor] = {}
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(k, num_prompts)
        if epoch not in orders:
            generator = torch.Generator().manual_seed(stream_seed(seed, "data", epoch))
            orders[epoch] = torch.randperm(num_prompts, generator=generator)
        out.append(int(orders[epoch][offset]))
    return out


@dataclass
class RunDir:
    """The run folder: config.yaml, metrics.jsonl, tb/ (TensorBoard), eval/, checkpoints/."""

    path: Path

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @staticmethod
    def check(cfg: TrainConfig) -> None:
        """Refuse, before any work and without touching anything, a folder that holds another run (or the same run
        with a different config), that is not empty, or that cannot be created or written."""
        path = Path(cfg.out_dir)
        existing = path / "config.yaml"
        if path.exists() and not path.is_dir():
            raise ConfigError(f"out_dir {str(path)!r} exists and is not a folder; choose another out_dir")
        if existing.exists():
            if not cfg.resume:
                raise ConfigError(
                    f"out_dir {str(path)!r} already holds a run; pass resume=true to continue it or choose another "
                    "out_dir"
                )
            differences = _config_differences(as_dict(load_config(existing)), as_dict(cfg))
            if differences:
                raise ConfigError(
                    f"resume=true but the config differs from the run in {str(path)!r} at {', '.join(differences)}; "
                    "resume with the same config or choose another out_dir"
                )
        elif path.exists() and any(path.iterdir()):
            raise ConfigError(f"out_dir {str(path)!r} is not empty and holds no run; choose an empty or new folder")
        ancestor = next(p for p in (path, *path.absolute().parents) if p.exists())
        if not ancestor.is_dir():
            raise ConfigError(f"out_dir {str(path)!r} cannot be created: {str(ancestor)!r} is a file; choose another "
                              "out_dir")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ConfigError(f"out_dir {str(path)!r} is not writable ({str(ancestor)!r} denies writing); choose "
                              "another out_dir")

    @staticmethod
    def create(cfg: TrainConfig) -> RunDir:
        path = Path(cfg.out_dir)
        try:
            path.mkdir(parents=True, exist_ok=True)
            if not (path / "config.yaml").exists():
                save_config(cfg, path / "config.yaml")
        except OSError as error:
            raise ConfigError(f"out_dir {str(path)!r} is not writable ({error.strerror}); choose another out_dir") from None
        return RunDir(path)


def _config_differences(saved: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ; resume and steps may change (a run can be extended)."""
    out = []
    for key in sorted(set(saved) | set(new)):
        path = f"{prefix}{key}"
        if path in ("resume", "steps"):
            continue
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, path + ".")
        elif a != b:
            out.append(path)
    return out


class MetricsLog:
    """metrics.jsonl (one JSON object per line) and TensorBoard scalars, truncated consistently on resume."""

    def __init__(self, run: RunDir, keep_lines: int, start_step: int):
        lines = run.metrics.read_text().splitlines() if run.metrics.exists() else []
        run.metrics.write_text("".join(line + "\n" for line in lines[:keep_lines]))
        self.lines = min(len(lines), keep_lines)
        self.file = run.metrics.open("a")
        self.tb = SummaryWriter(str(run.path / "tb"), purge_step=start_step if start_step > 0 else None)

    def write(self, step: int, values: dict) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        self.lines += 1
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()


@dataclass
class Preemption:
    """SIGTERM / SIGINT ask the loop to checkpoint at the end of the current step and exit cleanly."""

    requested: bool = False
    previous: dict = field(default_factory=dict)

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def rollout_stats(rollouts: list[Rollout]) -> dict[str, float]:
    """Behavior diagnostics of a step's rollouts (METHOD.md section 4), averaged over completion tokens."""
    mask = torch.cat([r.completion_mask.flatten() for r in rollouts])
    beta = torch.cat([r.beta.flatten() for r in rollouts])[mask]
    kl = torch.cat([r.realized_kl.flatten() for r in rollouts])[mask]
    from_teacher = torch.cat([r.from_teacher.flatten() for r in rollouts])[mask]
    lengths = torch.cat([r.lengths for r in rollouts]).float()
    stopped = torch.cat([r.stopped for r in rollouts]).float()
    return {
        "rollout/mean_beta": beta.mean().item(),
        "rollout/frac_beta_one": (beta == 1).float().mean().item(),
        "rollout/realized_kl": kl.mean().item(),
        "rollout/realized_kl_max": kl.max().item(),
        "rollout/from_teacher": from_teacher.float().mean().item(),
        "rollout/length": lengths.mean().item(),
        "rollout/stop_rate": stopped.mean().item(),
    }


def save_rollouts(path: Path, step: int, rollout: Rollout, count: int, tokenizer, schedule: dict) -> None:
    """A few rollouts with their per-token records (beta, log-probs, injection), for `trb inspect`."""
    records = []
    for row in range(min(count, len(rollout.stopped))):
        mask = rollout.completion_mask[row]
        ids = rollout.completion_ids[row][mask].tolist()

        def column(values):
            return None if values is None else [round(v, 5) for v in values[row][mask].tolist()]

        records.append({
            "prompt": tokenizer.decode(rollout.prompt_ids[row][rollout.prompt_mask[row]].tolist()),
            "tokens": [tokenizer.decode([i]) for i in ids],
            "beta": column(rollout.beta),
            "student_logp": column(rollout.student_logp),
            "teacher_logp": column(rollout.teacher_logp),
            "behavior_logp": column(rollout.behavior_logp),
            "realized_kl": column(rollout.realized_kl),
            "from_teacher": rollout.from_teacher[row][mask].tolist(),
            "stopped": bool(rollout.stopped[row]),
        })
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"step": step, **schedule, "rollouts": records}))


@dataclass
class Setup:
    """Everything a run needs, loaded and checked before any heavy work."""

    run: RunDir
    device: torch.device
    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: object
    vocab: object
    prompts: list[list[int]]  # training prompts, token ids
    solutions: list[list[int]]  # their dataset solutions + EOS, token ids (GKD's fixed data)
    test_problems: list

    @property
    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()


def setup(cfg: TrainConfig) -> Setup:
    """Load and check models, tokenizers and data; only then create (or reopen) the run folder."""
    RunDir.check(cfg)
    device = resolve_device(cfg.device)
    teacher_dtype = cfg.models.teacher_dtype
    if teacher_dtype == "auto":
        teacher_dtype = "bfloat16" if device.type == "cuda" else "float32"
    tokenizer = load_tokenizer(cfg.models.student, cfg.models.trust_remote_code)
    teacher_tokenizer = load_tokenizer(cfg.models.teacher, cfg.models.trust_remote_code)
    student = load_causal_lm(cfg.models.student, device, "float32", cfg.models.trust_remote_code)
    teacher = load_causal_lm(cfg.models.teacher, device, teacher_dtype, cfg.models.trust_remote_code)
    teacher.requires_grad_(False)
    vocab = vocab_space(tokenizer, teacher_tokenizer, student, teacher)
    d = cfg.data
    train_problems, test_problems = problem_splits(d.source, d.num_train, d.num_test, d.seed, d.test_source, d.fields)
    prompts = tokenize_prompts(tokenizer, [p.question for p in train_problems], d.system_prompt)
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    if len(prompts[longest]) > d.max_prompt_tokens:
        raise ConfigError(
            f"training prompt {longest} has {len(prompts[longest])} tokens, more than data.max_prompt_tokens="
            f"{d.max_prompt_tokens}; raise it or shorten the prompts"
        )
    context = min(student.config.max_position_embeddings, teacher.config.max_position_embeddings)
    if len(prompts[longest]) + cfg.max_new_tokens > context:
        raise ConfigError(
            f"training prompt {longest} ({len(prompts[longest])} tokens) plus max_new_tokens={cfg.max_new_tokens} "
            f"exceeds the models' context of {context} positions; lower max_new_tokens or data.max_prompt_tokens"
        )
    solutions = [ids + [vocab.eos_id] for ids in
                 tokenizer([p.solution for p in train_problems], add_special_tokens=False)["input_ids"]]
    return Setup(RunDir.create(cfg), device, student, teacher, tokenizer, vocab, prompts, solutions, test_problems)


def sft_warmup(cfg: TrainConfig, s: Setup, method: SFTWarmup, metrics: MetricsLog, log) -> None:
    """The SFT-warmup baseline's first phase: teacher samples for the prompts of the first `prompt_steps` steps,
    `updates` AdamW updates of token-mean cross-entropy on them (a fresh optimizer), before OPD starts."""
    generator = torch.Generator(device=s.device).manual_seed(stream_seed(cfg.seed, "sft"))
    indices = [i for step in range(method.prompt_steps)
               for i in step_prompts(step, cfg.prompts_per_step, len(s.prompts), cfg.seed)]
    batch = [s.prompts[i] for i in indices for _ in range(method.samples_per_prompt)]
    with s.autocast:
        samples = [generate(TeacherPolicy(), batch[i : i + cfg.rollout_batch], s.vocab, cfg.max_new_tokens, generator,
                            teacher=s.teacher) for i in range(0, len(batch), cfg.rollout_batch)]
    pairs = [(r.prompt_ids[row][r.prompt_mask[row]].tolist(), r.completion_ids[row][r.completion_mask[row]].tolist())
             for r in samples for row in range(len(r.stopped))]  # (prompt, teacher response) token lists
    order = torch.randperm(len(pairs), generator=generator).tolist()
    optimizer = torch.optim.AdamW(s.student.parameters(), lr=cfg.lr, betas=cfg.adam_betas,
                                  weight_decay=cfg.weight_decay)
    s.student.train()
    for update in range(method.updates):
        chosen = [pairs[j] for j in order[update :: method.updates]]
        num_tokens = sum(len(response) for _, response in chosen)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(0, len(chosen), cfg.micro_batch):
            part = chosen[i : i + cfg.micro_batch]
            micro = rollout_from_tokens([p for p, _ in part], [r for _, r in part], s.vocab, s.device)
            with s.autocast:
                loss = sft_loss(s.student, micro, s.vocab, micro.completion_mask.float() / max(num_tokens, 1),
                                cfg.loss.chunk_size)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(s.student.parameters(), cfg.grad_clip)
        optimizer.step()
        metrics.write(0, {"sft/update": update + 1, "sft/loss": total})
    log(f"SFT warmup: {method.updates} updates on {len(pairs)} teacher samples, last loss {total:.4f}")


def train(cfg: TrainConfig, log=print) -> dict:
    """Run (or resume) a training run; returns a summary with the final evaluation."""
    s = setup(cfg)
    run, student, teacher, vocab, method = s.run, s.student, s.teacher, s.vocab, cfg.method
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=cfg.adam_betas,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_ramp(step + 1, 0.0, 1.0, cfg.warmup_steps)
    )
    start_step, metric_lines, method_state = 0, 0, {}
    checkpoint = latest_checkpoint(run.checkpoints) if cfg.resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, student, optimizer, scheduler)
        start_step, metric_lines, method_state = state["next_step"], state["metric_lines"], state["method_state"]
        log(f"resumed {run.path} from {checkpoint.name} (next step {start_step})")
    if start_step >= cfg.steps and (run.path / "summary.json").exists():
        log(f"{run.path} already completed {cfg.steps} steps")
        return json.loads((run.path / "summary.json").read_text())
    if start_step > cfg.steps:
        raise ConfigError(f"the run in {str(run.path)!r} has done {start_step} steps, more than steps={cfg.steps}")
    metrics = MetricsLog(run, metric_lines, start_step)

    def run_eval(step: int) -> dict:
        with s.autocast:
            result = evaluate(student, s.tokenizer, s.test_problems, vocab, n_samples=cfg.eval_samples,
                              max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch,
                              seed=stream_seed(cfg.seed, "eval", step), teacher=teacher,
                              system_prompt=cfg.data.system_prompt)
        (run.path / "eval").mkdir(exist_ok=True)
        (run.path / "eval" / f"step_{step:08d}.json").write_text(
            json.dumps({"step": step, **result.as_dict(), "per_problem": result.per_problem,
                        "examples": result.examples}, indent=1))
        values = {f"eval/{k}": v for k, v in result.as_dict().items() if v is not None}
        metrics.write(step, values)
        return values

    def save(next_step: int) -> None:
        state = {"next_step": next_step, "metric_lines": metrics.lines, "method_state": method_state,
                 "data_position": next_step * cfg.prompts_per_step, "seed": cfg.seed}
        save_checkpoint(run.checkpoints, next_step, student, s.tokenizer, optimizer, scheduler, state,
                        cfg.keep_checkpoints)

    last_eval = {}
    if checkpoint is None:
        last_eval = run_eval(0)
        log(f"step 0: pass@1 {last_eval['eval/pass_at_1']:.3f}")
        if isinstance(method, SFTWarmup):
            sft_warmup(cfg, s, method, metrics, log)
            save(0)
    status = "completed"
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc=method.name,
               dynamic_ncols=True, disable=None)
    with Preemption() as preemption:
        for step in bar:
            started = time.perf_counter()
            generator = torch.Generator(device=s.device).manual_seed(stream_seed(cfg.seed, step, 0, "rollout"))
            indices = step_prompts(step, cfg.prompts_per_step, len(s.prompts), cfg.seed)
            student.eval()
            if method.use_data(step, torch.Generator().manual_seed(stream_seed(cfg.seed, step, "coin"))):
                rollouts = [rollout_from_tokens([s.prompts[i] for i in indices], [s.solutions[i] for i in indices],
                                                vocab, s.device)]
            else:
                batch = [s.prompts[i] for i in indices for _ in range(cfg.rollouts_per_prompt)]
                policy = method.behavior(step, method_state)
                with s.autocast:
                    rollouts = [
                        generate(policy, batch[i : i + cfg.rollout_batch], vocab, cfg.max_new_tokens, generator,
                                 student=student, teacher=teacher)
                        for i in range(0, len(batch), cfg.rollout_batch)
                    ]
            rollout_time = time.perf_counter() - started
            if cfg.log_rollouts_every and step % cfg.log_rollouts_every == 0:
                save_rollouts(run.path / "rollouts" / f"step_{step:08d}.json", step, rollouts[0], cfg.log_rollouts,
                              s.tokenizer, method.schedule_metrics(step, method_state))
            student.train()

            num_tokens = sum(int(r.completion_mask.sum()) for r in rollouts)
            loss_spec, target = method.loss_spec(cfg.loss), method.target(step)
            loss_sum, diagnostics = 0.0, {"teacher_kl": 0.0, "teacher_entropy": 0.0}
            optimizer.zero_grad(set_to_none=True)
            for rollout in rollouts:
                for i in range(0, len(rollout.stopped), cfg.micro_batch):
                    micro = rollout.select(slice(i, i + cfg.micro_batch))
                    weight = method.token_weights(micro) / max(num_tokens, 1)  # (b, T)
                    with s.autocast:
                        loss, _, per_token = distill_loss(student, teacher, micro, vocab, loss_spec, weight, target)
                    loss.backward()
                    loss_sum += loss.item()
                    for name in diagnostics:
                        diagnostics[name] += (per_token[name] * micro.completion_mask).sum().item() / max(num_tokens, 1)
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip).item()
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                last = latest_checkpoint(run.checkpoints)
                raise NumericalError(
                    f"non-finite {'loss' if not math.isfinite(loss_sum) else 'gradient'} at step {step}; nothing was "
                    f"applied and the last good checkpoint is {last or 'none'}; lower lr or check the models"
                )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            values = {
                "loss": loss_sum,
                **diagnostics,
                "grad_norm": grad_norm,
                "lr": lr,
                "tokens": num_tokens,
                "tokens_per_s": num_tokens / max(rollout_time, 1e-9),
                "time/rollout_s": rollout_time,
                "time/step_s": time.perf_counter() - started,
                **method.schedule_metrics(step, method_state),
                **rollout_stats(rollouts),
            }
            method.observe(step, values, method_state)
            metrics.write(step + 1, values)
            done = step + 1
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                last_eval = run_eval(done)
                tqdm.write(f"step {done}: pass@1 {last_eval['eval/pass_at_1']:.3f}")
            bar.set_postfix(loss=f"{loss_sum:.4f}", pass1=f"{last_eval.get('eval/pass_at_1', float('nan')):.3f}")
            if preemption.requested:
                save(done)
                status = "preempted"
                log(f"stopped by signal after step {done}; checkpoint saved, resume with resume=true")
                break
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                save(done)
    bar.close()
    if status == "completed":
        last_eval = run_eval(cfg.steps)
        log(f"step {cfg.steps}: pass@1 {last_eval['eval/pass_at_1']:.3f}")
        save(cfg.steps)
    metrics.close()
    summary = {"status": status, "run": str(run.path), "final": last_eval,
               "hardware": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), {s.device}"}
    if status == "completed":  # summary.json marks a finished run
        (run.path / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
