"""One on-policy reverse-KL training step, end to end: trb against TRL's DistillationTrainer, same models and data,
plus where trb's milliseconds go (rollout, teacher forward, student loss forward+backward, optimizer) next to a floor
computed from FLOPs and bytes at this device's measured matmul throughput and memory bandwidth.

    python benchmarks/bench_train_step.py                          # CPU: the shipped arith miniature
    python benchmarks/bench_train_step.py --device cuda --student DIR --teacher DIR --new-tokens 256 [--compile]

A step is B = prompts x rollouts sequences: sample completions from the student at temperature 1 (up to
--new-tokens), full-vocabulary reverse KL against the teacher at every completion token, AdamW step. TRL runs its
DistillationTrainer (beta = 1: reverse KL, on-policy generation) on the same formatted prompts, B per step. Times are
medians over the timed steps after a warm-up step. The last stdout line is JSON with the device name.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, emit, synchronize  # noqa: E402

from trb.forward import FinalHidden, aligned_groups, completion_select  # noqa: E402
from trb.losses import LossSpec, distill_loss  # noqa: E402
from trb.models import load_causal_lm, load_tokenizer, vocab_space  # noqa: E402
from trb.rollout import StudentPolicy, generate  # noqa: E402
from trb.tasks import SETTINGS, format_prompt  # noqa: E402


def measure_peaks(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(matmul FLOP/s, copy bytes/s) measured on this device: the floor's hardware numbers."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    x = torch.empty((256 if device.type == "cuda" else 16) * 2**20, device=device)  # 1 GiB / 64 MiB, past the caches
    y = torch.empty_like(x)  # copied into, not allocated per copy (fresh pages would be timed too)
    best_flops, best_bw = 0.0, 0.0
    for _ in range(3):
        synchronize(device)
        t = time.perf_counter()
        a @ b
        synchronize(device)
        best_flops = max(best_flops, 2 * n**3 / (time.perf_counter() - t))
        t = time.perf_counter()
        y.copy_(x)
        synchronize(device)
        best_bw = max(best_bw, 2 * x.numel() * 4 / (time.perf_counter() - t))
    return best_flops, best_bw


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def body_params(model) -> int:
    """Parameters that cost 2 FLOPs per token in a forward: all but the input embedding (a lookup) and the output
    layer (counted separately, since the training forwards leave it to the chunked loss)."""
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def time_trb(student, teacher, vocab, prompts, args, device):
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    spec = LossSpec(divergence="reverse_kl", length_groups=args.length_groups,
                    compile=args.compile or args.compile_loss)
    forward = "hf" if args.hf_forward else "auto"
    phases = {"rollout": [], "teacher_forward": [], "loss_forward_backward": [], "optimizer": [], "step": []}
    tokens = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    for step in range(args.steps + 1):
        synchronize(device)
        t0 = time.perf_counter()
        student.eval()
        with autocast:
            rollout = generate(StudentPolicy(), prompts, vocab, args.new_tokens,
                               torch.Generator(device=device).manual_seed(step), student=student,
                               compile=args.compile)
        synchronize(device)
        t1 = time.perf_counter()
        ids, mask, pos = rollout.sequences()
        with torch.no_grad(), autocast:
            # timed alone: the teacher's share of the loss phase
            FinalHidden(teacher, args.length_groups, spec.compile, forward)(ids, mask, pos, completion_select(rollout))
        synchronize(device)
        t2 = time.perf_counter()
        student.train()
        optimizer.zero_grad(set_to_none=True)
        n = rollout.completion_mask.sum()
        with autocast:
            loss, _, _ = distill_loss(student, teacher, rollout, vocab, spec, rollout.completion_mask.float() / n,
                                      student_hidden_fn=FinalHidden(student, args.length_groups, spec.compile, forward),
                                      teacher_hidden_fn=FinalHidden(teacher, args.length_groups, spec.compile, forward))
        loss.backward()
        synchronize(device)
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        synchronize(device)
        t4 = time.perf_counter()
        if step == 0:
            continue  # warm-up
        lengths, prompt_lengths = rollout.completion_mask.sum(1), rollout.prompt_mask.sum(1)  # (B,)
        # cache slots the decode steps read: token t of a row attends to its prompt and t earlier tokens
        slots = int((lengths * prompt_lengths + lengths * (lengths - 1) // 2).sum())
        groups = aligned_groups(mask, args.length_groups)  # what the training forwards process
        processed = mask.numel() if groups is None else sum(columns.numel() for _, columns in groups)
        tokens.append((int(rollout.completion_mask.sum()), int(mask.sum()), int(lengths.max()), slots,
                       {"padded_rectangle": mask.numel(), "processed_in_groups": processed}))
        teacher_ms = (t2 - t1) * 1e3
        phases["rollout"].append((t1 - t0) * 1e3)
        phases["teacher_forward"].append(teacher_ms)
        phases["loss_forward_backward"].append((t3 - t2) * 1e3 - teacher_ms)  # the loss pass runs the teacher again
        phases["optimizer"].append((t4 - t3) * 1e3)
        phases["step"].append((t1 - t0 + t3 - t2 + t4 - t3) * 1e3)
    return {k: statistics.median(v) for k, v in phases.items()}, tokens[-1]


def time_trl(student_path, teacher, tokenizer, texts, args, device):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, *a, **k):
            synchronize(device)
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            synchronize(device)
            self.times.append((time.perf_counter() - self.start) * 1e3)

    timer = StepTimer()
    config = DistillationConfig(
        output_dir=str(Path(args.scratch) / "trl"), max_steps=args.steps + 1, per_device_train_batch_size=len(texts),
        gradient_accumulation_steps=1, learning_rate=1e-5, max_completion_length=args.new_tokens, temperature=1.0,
        top_k=0, top_p=1.0, beta=1.0, bf16=args.precision == "bf16", gradient_checkpointing=False, report_to=[],
        logging_steps=1000, save_strategy="no", use_cpu=device.type == "cpu", shuffle_dataset=False,
        disable_dropout=True, seed=0, dataloader_drop_last=True,
    )
    student = load_causal_lm(student_path, device)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config,
                                  train_dataset=Dataset.from_dict({"prompt": texts * (args.steps + 2)}),
                                  processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return statistics.median(timer.times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--student", default="trb:miniature/arith/student")
    parser.add_argument("--teacher", default="trb:miniature/arith/teacher")
    parser.add_argument("--setting", default="arith", help="problems to prompt with")
    parser.add_argument("--prompts", type=int, default=64, help="sequences per step")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="bf16 autocast for both trb and TRL (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--length-groups", type=int, default=LossSpec.length_groups,
                        help="trb's training forwards in this many groups of similar length (1: one padded batch)")
    parser.add_argument("--compile", action="store_true",
                        help="trb's rollouts with the policy math compiled, and its loss with the compiled training "
                        "forwards and closed-form reverse KL")
    parser.add_argument("--compile-loss", action="store_true",
                        help="only the loss compiled (loss.compile: training forwards and closed form); eager rollouts")
    parser.add_argument("--hf-forward", action="store_true",
                        help="trb's training forwards through the Hugging Face base model instead of the lean forward "
                        "(models.forward: hf)")
    parser.add_argument("--teacher-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the frozen teacher's weights (models.teacher_dtype); both trainers use this teacher")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--scratch", default="/tmp/trb-bench")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    tokenizer = load_tokenizer(args.student)
    student = load_causal_lm(args.student, device)
    teacher = load_causal_lm(args.teacher, device, dtype=args.teacher_dtype)  # TRL gets this same teacher
    teacher.requires_grad_(False)
    vocab = vocab_space(tokenizer, load_tokenizer(args.teacher), student, teacher)
    texts = [format_prompt(tokenizer, p.question) for p in SETTINGS[args.setting]("test", args.prompts, 0)]
    prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]

    trb_ms, (completion_tokens, all_tokens, decode_steps, cache_slots, forward_tokens) = time_trb(
        student, teacher, vocab, prompts, args, device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    flops_per_s, bytes_per_s = measure_peaks(device, dtype)
    n_s, n_t = params(student), params(teacher)
    body_s, body_t = body_params(student), body_params(teacher)
    out_s, out_t = student.get_output_embeddings().weight.numel(), teacher.get_output_embeddings().weight.numel()
    config = student.config
    head_dim = student.base_model.layers[0].self_attn.head_dim
    kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype.itemsize  # one cache slot
    floor = {  # FLOPs at the measured matmul rate; weight and optimizer traffic at the measured copy rate
        # every decode step reads the student's weights (fp32) once and every token its cache slots; every token
        # costs body + output-layer FLOPs
        "rollout": max(2 * (body_s + out_s) * completion_tokens / flops_per_s,
                       (decode_steps * n_s * 4 + cache_slots * kv_bytes) / bytes_per_s) * 1e3,
        "teacher_forward": 2 * body_t * all_tokens / flops_per_s * 1e3,  # hidden states only, as timed
        # student body forward + backward on every token; output layers at completion positions only: the
        # student's forward + backward, the teacher's forward
        "loss_forward_backward": (6 * body_s * all_tokens + 2 * completion_tokens * (3 * out_s + out_t))
        / flops_per_s * 1e3,
        "optimizer": n_s * 28 / bytes_per_s * 1e3,  # read/write weights, Adam moments; read gradients (fp32)
    }
    # a step is the rollout, the loss pass (which runs the teacher's forward once) and the optimizer
    floor["step"] = floor["rollout"] + floor["teacher_forward"] + floor["loss_forward_backward"] + floor["optimizer"]
    result = {
        "benchmark": "train_step", "device": device_name(device), "torch": torch.__version__,
        "student": args.student, "teacher": args.teacher, "student_params": n_s, "teacher_params": n_t,
        "precision": args.precision, "length_groups": args.length_groups, "compile": args.compile,
        "compile_loss": args.compile or args.compile_loss, "lean_forward": not args.hf_forward,
        "teacher_dtype": args.teacher_dtype,
        "sequences": len(prompts),
        "new_tokens": args.new_tokens, "decode_steps": decode_steps, "completion_tokens": completion_tokens,
        "sequence_tokens": all_tokens, "forward_tokens": forward_tokens, "matmul_gflops": round(flops_per_s / 1e9, 1),
        "copy_gbytes_per_s": round(bytes_per_s / 1e9, 1),
        "trb_ms": {k: round(v, 1) for k, v in trb_ms.items()},
        "floor_ms": {k: round(v, 2) for k, v in floor.items()},
    }
    if not args.skip_trl:
        trl_ms = time_trl(args.student, teacher, tokenizer, texts, args, device)
        result["trl_step_ms"] = round(trl_ms, 1)
        result["speedup_vs_trl"] = round(trl_ms / trb_ms["step"], 2)
    emit(result)


if __name__ == "__main__":
    main()
