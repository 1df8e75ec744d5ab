"""Training throughput, side by side in one run: TRL defaults, TRL's best setting, and the service's path.

Variants (same model shape, data, optimizer settings and step count):
  a          TRL defaults: padded batches of --batch sequences (gradient checkpointing on, TRL's default)
  b          TRL packing + padding_free + Liger kernels, --budget tokens per step
  b-nockpt   b with gradient checkpointing off
  c          the service's training path as a task builds it (build_trainer): packing with document-masked
             attention (varlen FlashAttention on CUDA), no gradient checkpointing, fused AdamW, Liger when installed
  c-flex     c with flex attention (document masking through a block mask)
  c-sdpa     c with SDPA attention (document masking through a dense mask)
  c-noliger  c without Liger's layer kernels
  c-compile  c with torch.compile
  c-compile-noliger c with torch.compile and without Liger (the compiler fuses the norms itself)
  c-ckpt     c with gradient checkpointing (b's memory)
  c-lora     c with LoRA r=16 on all linear layers (the service's LoRA defaults)
  c-lora-d05 c-lora with lora_dropout 0.05 (PEFT's forward, adapter weights cast to bf16)
  c-lora-peft c-lora as PEFT has it by default: each adapted layer's input cast to fp32, dropout 0.05
  c-lora-addmm c-lora with the first fused LoRA step (base GEMM, then the adapter product added onto its output
             with addmm, adapter weights cast on every call, no stacked [W; A] layers): what this round's LoRA
             changes buy together
  c-liger-norm c with Liger's RMSNorm kept (the service now routes the norms through F.rms_norm on CUDA)
  c-lora-liger-norm c-lora with Liger's RMSNorm kept
  c-all      c with the loss on every token, as TRL computes it in a and b (the service's default is the
             assistant's tokens only): its loss curve is comparable step by step with b's
  c-default  the service's defaults: a request with no batch size, max_length, packing or checkpointing set,
             so the auto token budget (service/train/budget.py) picks the step from the GPU's free memory. Rows are
             train.max_length (1024) tokens: with --max-length 1024, c@N at the chosen N has the same batches and
             loss curve. The bench times --steps optimizer steps: it sets max_steps after the build (the auto rule
             would shrink the request's max_steps by the budget / 2048 factor to keep the tokens)
  c-default-lora c-default with the lora strategy (its defaults: r=16, all-linear)
The *-noliger variants measure what they say only in a process where no earlier variant applied Liger (Liger
patches the model classes for the rest of the process): run them in their own invocation.
A variant written NAME@TOKENS runs with TOKENS tokens per step instead of --budget (packed variants).
With --profile, each service variant then runs a few more steps timed by part (data, forward, backward,
optimizer), plus one torch.profiler pass whose kernel time is summed by kind (matmul, attention, ...).

Prints real (non-pad) tokens/s over the steps after --warmup, MFU against a bf16 ceiling, peak memory and the
loss after the last step, the ratios c/a and c/b, and the packed-vs-alone loss gap of one packed batch. Real
tokens come from the trainer's non-padding count: for padding-free rows it leaves out tokens equal to the pad
id (SmolLM2's pad is its end-of-turn token), which undercounts the packed variants by a few percent.

--tiny builds a 2-layer model of hidden size 64 instead (a CPU smoke run); --budget-memory-gib G makes the auto
budget plan for G GiB (on CPU it then applies too, with packing on: the CPU smoke run of c-default).

Usage: python bench/train_throughput.py --tokenizer DIR [--random-0.5b | --tiny] [--steps 20]
       [--variants a,b,c,c@32768,c-default] [--budget 8192] [--batch 8] [--records 600] [--profile]
       [--budget-memory-gib G] [--json-out FILE]
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
import torch.nn.functional as F
from service_train import build_qwen_05b, synthetic_chats
from transformers import TrainerCallback

from entity.train import TrainRequest
from service import models
from service.train import fused_lora
from service.train.packing import packed_loss_gaps
from service.train.runner import build_trainer
from service.train.service import task_request
from util.settings import load_settings

BF16_CEILING = 790e12  # measured bf16 matmul rate of the lent H100 (TFLOP/s x 1e12)
SERVICE_VARIANTS: dict[str, dict[str, Any]] = {
    "c": {},
    "c-flex": {"attn_implementation": "flex_attention"},
    "c-sdpa": {"attn_implementation": "sdpa"},
    "c-noliger": {"use_liger_kernel": False},
    "c-compile": {"torch_compile": True},
    "c-compile-noliger": {"torch_compile": True, "use_liger_kernel": False},
    "c-ckpt": {"gradient_checkpointing": True},
    "c-lora": {"lora": True},
    "c-lora-d05": {"lora": True, "lora_config": {"lora_dropout": 0.05}},
    "c-lora-peft": {"lora": True, "peft_default": True, "lora_config": {"lora_dropout": 0.05}},
    "c-lora-addmm": {"lora": True, "lora_impl": "addmm"},
    "c-liger-norm": {"norm": "before"},
    "c-lora-liger-norm": {"lora": True, "norm": "before"},
    "c-all": {"assistant_only_loss": False},
    "c-default": {"defaults": True},
    "c-default-lora": {"defaults": True, "lora": True},
}
LORA_FUNCTION = fused_lora.LoraLinearFunction
TRL_VARIANTS = ("a", "b", "b-nockpt")
KERNEL_KINDS = (  # first match wins, on the lower-cased kernel name
    ("attention", ("flex", "attention", "fmha", "flash")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "matmul")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("cross-entropy", ("cross_entropy", "fused_linear")),
    ("liger norm/rope/swiglu", ("rms_norm", "rope", "swiglu", "_layer_norm")),
)


class AddmmLoraFunction(torch.autograd.Function):
    """The first fused LoRA step, for comparison: the adapter product added after the base GEMM, casts per call."""

    @staticmethod
    def forward(
        ctx: Any, x: Any, weight: Any, bias: Any, lora_a: Any, lora_b: Any, a_w: Any, sb_w: Any, s: float
    ) -> Any:
        """The base GEMM (and bias), then the adapter product added onto it; the cached casts handed in unused."""
        a_w, b_w = lora_a.to(x.dtype), lora_b.to(x.dtype)
        flat = x.reshape(-1, x.shape[-1])
        a = flat @ a_w.t()
        y = F.linear(flat, weight, bias).addmm_(a, b_w.t(), alpha=s)
        ctx.save_for_backward(flat, a, weight, a_w, b_w)
        ctx.scaling, ctx.x_shape, ctx.has_bias = s, x.shape, bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_y: Any) -> tuple[Any, ...]:
        """The input gradient g W first, the adapter's part added onto it."""
        flat, a, weight, a_w, b_w = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        grad_a = (g @ b_w).mul_(ctx.scaling)
        grad_x = (g @ weight).addmm_(grad_a, a_w).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_lora_a = (grad_a.t() @ flat).float()
        grad_lora_b = (g.t() @ a).mul_(ctx.scaling).float()
        return grad_x, None, grad_bias, grad_lora_a, grad_lora_b, None, None, None


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


def build_tiny(tokenizer_dir: Path, out: Path) -> Path:
    """A 2-layer Qwen2 of hidden size 64 with random weights and the tokenizer's vocabulary (a CPU smoke run)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def fresh_memory() -> None:
    """Free the previous variant before the next one's peak is measured."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_trl(
    name: str, budget: int, model_dir: Path, data: Path, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
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
        rows = max(1, budget // args.max_length)
        shape = {"per_device_train_batch_size": rows, "max_length": args.max_length, "packing": True}
        shape |= {"padding_free": True, "use_liger_kernel": models.liger_available()}
        if name == "b-nockpt":
            shape["gradient_checkpointing"] = False
    config = SFTConfig(
        output_dir=str(work / f"{name}-{budget}"),
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
    row["gradient_checkpointing"] = bool(config.gradient_checkpointing)
    del trainer, model
    return row


def run_service(
    name: str, budget: int, model_dir: Path, data: Path, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Variant c*: the trainer a train task builds, from the same request a client would send."""
    fresh_memory()
    extra = dict(SERVICE_VARIANTS[name])
    lora = extra.pop("lora", False)
    peft_default = extra.pop("peft_default", False)
    lora_impl, norm = extra.pop("lora_impl", None), extra.pop("norm", None)
    lora_config = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"} | extra.pop("lora_config", {})
    defaults = extra.pop("defaults", False)
    overrides: dict[str, Any] = {
        "paths": {"data_dir": work / "data", "model_dir": work / "models", "db_path": work / "t.db"}
    }
    if args.budget_memory_gib is not None:  # plan for this much memory (and on CPU, pack so that the rule applies)
        packing = "auto" if torch.cuda.is_available() else "on"
        overrides["train"] = {"budget_memory_gib": args.budget_memory_gib, "packing": packing}
    settings = load_settings(None, overrides)
    config: dict[str, Any] = {"max_steps": args.steps, "learning_rate": 1e-4, "seed": 0, "save_steps": 10**9}
    if not defaults:  # seed 0: a and b's data order
        config |= {"per_device_train_batch_size": max(1, budget // args.max_length), "max_length": args.max_length}
        config |= {"packing": True, "lora_config": lora_config}
    req = TrainRequest.model_validate(
        {"strategy": "lora" if lora else "trl", "dataset_path": str(data), "config": config | extra}
    )
    request = task_request(req, data, None, model_dir, work / "out" / f"{name}-{budget}")
    built = build_trainer(settings, None, name, request)
    trainer = built.trainer
    if defaults:  # time --steps steps of the chosen budget (the auto rule shrank max_steps to keep the tokens)
        trainer.args.max_steps = args.steps
    if peft_default:  # undo the fused LoRA path, to measure what it saves
        for module in trainer.model.modules():
            if "_peft_forward" in module.__dict__:  # a LoRA layer: PEFT's forward and its input cast back
                del module.__dict__["_peft_forward"], module.__dict__["forward"]
                module.cast_input_dtype_enabled = True
            elif isinstance(module, torch.nn.Linear):  # an adapter matmul: nn.Linear's own forward back
                module.__dict__.pop("forward", None)
    if norm == "before":  # the norms as before the service's F.rms_norm: the model's own, then Liger's if installed
        for module in trainer.model.modules():
            if "_norm_forward_before" in module.__dict__:
                module.forward = module.__dict__.pop("_norm_forward_before")
        (trainer.args.liger_kernel_config or {}).pop("rms_norm", None)
    fused_lora.LoraLinearFunction = AddmmLoraFunction if lora_impl == "addmm" else LORA_FUNCTION
    if lora_impl == "addmm":  # no stacked [W; A] layers either: every layer through the first fused step
        for module in trainer.model.modules():
            module.__dict__.pop("_lora_stacked", None)
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v.to(built.device) if hasattr(v, "to") else v for k, v in batch.items()}
    gaps = packed_loss_gaps(trainer.model.eval(), batch, alone_attention="sdpa")  # the reference kernel alone
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
    row["gradient_checkpointing"] = bool(built.args.gradient_checkpointing)
    row["token_budget"] = built.budget
    if args.profile:
        row |= profile_parts(trainer, args.profile_steps)
        row |= profile_kernels(trainer, work / f"kernels-{name}-{budget}.txt")
    fused_lora.LoraLinearFunction = LORA_FUNCTION
    del trainer, built
    return row


def sync() -> float:
    """Wait for the GPU, then read the clock."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def one_step(trainer: Any, it: Any) -> dict[str, float]:
    """One optimizer step as the trainer takes it, timed by part (ms), each part synchronised."""
    t0 = sync()
    batch = trainer._prepare_inputs(next(it))
    t1 = sync()
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, batch)
    t2 = sync()
    trainer.accelerator.backward(loss)
    t3 = sync()
    trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    t4 = sync()
    ms = {"data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2}
    ms |= {"optimizer": t4 - t3, "step": t4 - t0}
    return {k: 1000 * v for k, v in ms.items()} | {"tokens": float(batch["input_ids"].numel())}


def profile_parts(trainer: Any, steps: int) -> dict[str, Any]:
    """Median time of each step part over a few more steps (each part synchronised: no overlap between parts)."""
    import statistics

    trainer.model.train()
    it = iter(trainer.get_train_dataloader())
    one_step(trainer, it)  # warm (a new length may compile)
    samples = [one_step(trainer, it) for _ in range(steps)]
    tokens = sum(s.pop("tokens") for s in samples)
    parts = {f"ms_{k}": round(statistics.median(s[k] for s in samples), 2) for k in samples[0]}
    return parts | {"tokens_per_s_parts": round(1000 * tokens / sum(s["step"] for s in samples), 1)}


def profile_kernels(trainer: Any, table_out: Path) -> dict[str, Any]:
    """GPU kernel time over 3 steps by kind, and how busy the GPU was over their wall time."""
    if not torch.cuda.is_available():
        return {}
    from torch.profiler import ProfilerActivity, profile

    it = iter(trainer.get_train_dataloader())
    one_step(trainer, it)
    t0 = sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            one_step(trainer, it)
    wall_us = 1e6 * (sync() - t0)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_kind: dict[str, float] = {}
    for event in kernels:
        name = event.name.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(key in name for key in keys)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + event.device_time_total
    busy = sum(by_kind.values())
    table_out.write_text(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40))
    return {
        "gpu_busy_pct": round(100 * busy / wall_us, 1),
        "kernels_per_step": len(kernels) // 3,
        "kernel_ms_per_step": {k: round(v / 3000, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
    }


def main() -> int:
    """Run the variants and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokenizer", type=Path, required=True, help="a model folder (weights used unless --random-0.5b)"
    )
    parser.add_argument("--random-0.5b", dest="random_05b", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer model of hidden size 64 (CPU smoke run)")
    parser.add_argument("--budget-memory-gib", type=float, default=None, help="memory the auto budget plans for")
    parser.add_argument("--variants", default="a,b,c")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--batch", type=int, default=8, help="padded batch of variant a")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--budget", type=int, default=8192, help="tokens per step of the packed variants")
    parser.add_argument("--records", type=int, default=600)
    parser.add_argument("--profile", action="store_true", help="time service variants by step part")
    parser.add_argument("--profile-steps", type=int, default=6)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    model_dir = args.tokenizer.resolve()
    if args.random_05b:
        model_dir = build_qwen_05b(args.tokenizer, work / "model")
    elif args.tiny:
        model_dir = build_tiny(args.tokenizer, work / "model")
    data = work / "data" / "train.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("\n".join(json.dumps(c) for c in synthetic_chats(args.records, seed=0)) + "\n")
    rows = []
    for spec in args.variants.split(","):
        name, _, budget = spec.partition("@")
        if name not in TRL_VARIANTS and name not in SERVICE_VARIANTS:
            parser.error(f"unknown variant {name!r}")
        runner = run_trl if name in TRL_VARIANTS else run_service
        tokens = int(budget or args.budget)
        rows.append(runner(name, tokens, model_dir, data, work, args) | {"variant": spec})
        print(json.dumps(rows[-1]), flush=True)
        kernel_table = work / f"kernels-{name}-{tokens}.txt"
        if kernel_table.exists() and args.json_out:  # beside the JSON, to read which kernels took the time
            (args.json_out.parent / kernel_table.name).write_text(kernel_table.read_text())
        if args.json_out:  # after every variant, so a run cut short keeps what it measured
            args.json_out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str))
    by_name = {r["variant"]: r for r in rows}
    for r in rows:
        for base in ("a", "b", "b-nockpt"):
            if base in by_name and r["variant"].startswith("c"):
                r[f"vs_{base}"] = round(r["real_tokens_per_s"] / by_name[base]["real_tokens_per_s"], 2)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"\ntraining throughput on {device}: {args.steps} steps ({args.warmup} warm-up), budget {args.budget}")
    cols = ["variant", "real_tokens_per_s", "mfu_pct", "peak_mem_gib", "tokens_per_step", "loss_last", "vs_a", "vs_b"]
    cols += ["vs_b-nockpt"]
    cols += ["packed_loss_gap_max", "attention"]
    if args.profile:
        cols += ["ms_step", "ms_data", "ms_forward", "ms_backward", "ms_optimizer", "gpu_busy_pct"]
    print(" | ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r.get(c, '')!s:>18}" for c in cols))
    for r in rows:
        if r.get("token_budget"):
            print(f"{r['variant']}: token budget {r['token_budget']['reason']}")
    if args.json_out:
        args.json_out.write_text(
            json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=2, default=str)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
