"""Training throughput, side by side in one run: TRL defaults, TRL's best setting, and the service's path.

Variants (same model shape, data, optimizer settings and step count):
  a        TRL defaults: padded batches of --batch sequences (gradient checkpointing on, TRL's default)
  b        TRL packing + padding_free + Liger kernels, --budget tokens per step
  c        the service's training path as a task builds it (build_trainer): packing with document-masked
           attention (flex attention on CUDA), no gradient checkpointing, fused AdamW, Liger when installed
  c-sdpa   c with SDPA attention (document masking through a dense mask)
  c-compile c with torch.compile
  c-lora   c with LoRA r=16 on all linear layers

Prints real (non-pad) tokens/s over the steps after --warmup, MFU against a bf16 ceiling, peak memory and the
loss after the last step, the ratios c/a and c/b, and the packed-vs-alone loss gap of one packed batch. Real
tokens come from the trainer's non-padding count: for padding-free rows it leaves out tokens equal to the pad
id (SmolLM2's pad is its end-of-turn token), which undercounts the packed variants by a few percent.

Usage: python bench/train_throughput.py --tokenizer DIR [--random-0.5b] [--steps 20] [--variants a,b,c]
       [--budget 8192] [--batch 8] [--records 600] [--json-out FILE]
"""

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from service_train import build_qwen_05b, synthetic_chats
from transformers import TrainerCallback

from entity.train import TrainRequest
from service import models
from service.train.packing import packed_loss_gaps
from service.train.runner import build_trainer
from service.train.service import task_request
from util.settings import load_settings

BF16_CEILING = 790e12  # measured bf16 matmul rate of the lent H100 (TFLOP/s x 1e12)
SERVICE_VARIANTS = {
    "c": {},
    "c-sdpa": {"attn_implementation": "sdpa"},
    "c-compile": {"torch_compile": True},
    "c-lora": {"lora": True},
}


class StepTimer(TrainerCallback):
    """Wall time and real tokens at each step end (synchronised), to time the steps after warm-up."""

    def __init__(self) -> None:
        """No steps yet."""
        self.marks: list[tuple[float, int]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        """Record (time, tokens seen)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), int(state.num_input_tokens_seen or 0)))


def summarize(name: str, timer: StepTimer, trainer: Any, warmup: int, n_params: int, lora: bool) -> dict[str, Any]:
    """Steady-state throughput, MFU, peak memory and the last loss of one variant."""
    warmup = max(1, min(warmup, len(timer.marks) - 1))
    (t0, tok0), (t1, tok1) = timer.marks[warmup - 1], timer.marks[-1]
    tps = (tok1 - tok0) / (t1 - t0)
    flops_per_token = (4 if lora else 6) * n_params  # LoRA computes no weight gradients for the frozen base
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {
        "variant": name,
        "real_tokens_per_s": round(tps, 1),
        "mfu_pct": round(100 * tps * flops_per_token / BF16_CEILING, 2) if torch.cuda.is_available() else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "tokens_per_step": round((tok1 - tok0) / max(1, len(timer.marks) - warmup), 1),
        "loss_last": round(losses[-1], 4) if losses else None,
        "losses": [round(x, 4) for x in losses],
    }


def fresh_memory() -> None:
    """Free the previous variant before the next one's peak is measured."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_trl(name: str, model_dir: Path, data: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Variant a or b: TRL's SFTTrainer driven directly, as a user would."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    fresh_memory()
    device, dtype = models.pick_device()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device)
    if name == "a":
        shape = {"per_device_train_batch_size": args.batch, "max_length": args.max_length}
    else:  # the same packed shape as the service's variants: rows of max_length, budget tokens per step
        rows = max(1, args.budget // args.max_length)
        shape = {"per_device_train_batch_size": rows, "max_length": args.max_length, "packing": True}
        shape |= {"padding_free": True, "use_liger_kernel": models.liger_available()}
    config = SFTConfig(
        output_dir=str(work / name),
        max_steps=args.steps,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=dtype == "bfloat16",
        seed=0,
        include_num_input_tokens_seen="non_padding",
        **shape,
    )
    timer = StepTimer()
    dataset = load_dataset("json", data_files=str(data), split="train")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.add_callback(timer)
    trainer.train()
    n_params = sum(p.numel() for p in model.parameters())
    row = summarize(name, timer, trainer, args.warmup, n_params, lora=False)
    del trainer, model
    return row


def run_service(name: str, model_dir: Path, data: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Variant c*: the trainer a train task builds, from the same request a client would send."""
    fresh_memory()
    extra = dict(SERVICE_VARIANTS[name])
    lora = extra.pop("lora", False)
    settings = load_settings(
        None, {"paths": {"data_dir": work / "data", "model_dir": work / "models", "db_path": work / "t.db"}}
    )
    req = TrainRequest.model_validate(
        {
            "strategy": "lora" if lora else "trl",
            "dataset_path": str(data),
            "config": {
                "max_steps": args.steps,
                "per_device_train_batch_size": max(1, args.budget // args.max_length),
                "max_length": args.max_length,
                "learning_rate": 1e-4,
                "save_steps": 10**9,
                "packing": True,
                "lora_config": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
                **extra,
            },
        }
    )
    request = task_request(req, data, None, model_dir, work / "out" / name)
    built = build_trainer(settings, None, name, request)
    trainer = built.trainer
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v.to(built.device) if hasattr(v, "to") else v for k, v in batch.items()}
    gaps = packed_loss_gaps(trainer.model.eval(), batch)
    trainer.model.train()
    fresh_memory()
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    n_params = sum(p.numel() for p in trainer.model.parameters())
    row = summarize(name, timer, trainer, args.warmup, n_params, lora=lora)
    row["packed_loss_gap_max"] = round(max(g["gap"] for g in gaps), 6)
    row["packed_examples_checked"] = len(gaps)
    row["attention"] = trainer.model.config._attn_implementation
    del trainer, built
    return row


def main() -> int:
    """Run the variants and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokenizer", type=Path, required=True, help="a model folder (weights used unless --random-0.5b)"
    )
    parser.add_argument("--random-0.5b", dest="random_05b", action="store_true")
    parser.add_argument("--variants", default="a,b,c")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--batch", type=int, default=8, help="padded batch of variant a")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--budget", type=int, default=8192, help="tokens per step of the packed variants")
    parser.add_argument("--records", type=int, default=600)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    model_dir = build_qwen_05b(args.tokenizer, work / "model") if args.random_05b else args.tokenizer.resolve()
    data = work / "data" / "train.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("\n".join(json.dumps(c) for c in synthetic_chats(args.records, seed=0)) + "\n")
    rows = []
    for name in args.variants.split(","):
        runner = run_trl if name in ("a", "b") else run_service
        rows.append(runner(name, model_dir, data, work, args))
        print(json.dumps(rows[-1]), flush=True)
    by_name = {r["variant"]: r for r in rows}
    for r in rows:
        for base in ("a", "b"):
            if base in by_name and r["variant"].startswith("c"):
                r[f"vs_{base}"] = round(r["real_tokens_per_s"] / by_name[base]["real_tokens_per_s"], 2)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"\ntraining throughput on {device}: {args.steps} steps ({args.warmup} warm-up), budget {args.budget}")
    cols = ["variant", "real_tokens_per_s", "mfu_pct", "peak_mem_gib", "tokens_per_step", "loss_last", "vs_a", "vs_b"]
    cols += ["packed_loss_gap_max", "attention"]
    print(" | ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r.get(c, '')!s:>18}" for c in cols))
    if args.json_out:
        args.json_out.write_text(
            json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=2, default=str)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
