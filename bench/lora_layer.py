"""One LoRA layer's forward + backward, by implementation, on the 0.5B Qwen2 shapes; and the RMSNorm calls.

LoRA implementations (r=16, scaling 2, bf16 activations, fp32 adapter weights, frozen bf16 base):
  base     the frozen base layer alone (F.linear, input gradient only): the floor
  peft     PEFT's math in plain autograd ops (adapter weights cast down, no dropout)
  addmm    the first fused step: base GEMM, then the adapter product added onto its output (addmm), casts per call
  fused    the service's LoraLinearFunction: the adapter product first, the base GEMM accumulating onto it, casts
           cached
  stacked  fused, with bias-free layers wider in than out (down_proj) through StackedLoraFunction: one GEMM over a
           stacked [W; A] weight reads x for both, and the input gradient is [g | s g B] @ [W; A]
Norms: transformers' Qwen2RMSNorm, Liger's (when installed) and F.rms_norm on [tokens, 896]: GPU time per call
(forward + backward) and host time per call (a small input, so the host is the limit).

Usage: python bench/lora_layer.py [--tokens 8192,32768] [--iters 20] [--json-out FILE]
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from train_throughput import AddmmLoraFunction

from service.train.fused_lora import LoraLinearFunction, StackedLoraFunction

SHAPES = {  # name: (in K, out N, bias) of Qwen2-0.5B's adapted layers
    "q": (896, 896, True),
    "k": (896, 128, True),
    "v": (896, 128, True),
    "o": (896, 896, False),
    "gate": (896, 4864, False),
    "up": (896, 4864, False),
    "down": (4864, 896, False),
}
RANK, SCALING = 16, 2.0


def make_layer(k: int, n: int, bias: bool, dev: str) -> dict[str, Any]:
    """Frozen bf16 base, fp32 adapter weights (B nonzero), and the casts the fused path caches."""
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k**-0.5
    b = torch.randn(n, device=dev, dtype=torch.bfloat16) if bias else None
    a = torch.nn.Parameter(torch.randn(RANK, k, device=dev) * k**-0.5)
    bb = torch.nn.Parameter(torch.randn(n, RANK, device=dev) * 0.01)
    a_w, sb_w = a.detach().bfloat16(), (bb.detach() * SCALING).bfloat16()
    return {"w": w, "b": b, "a": a, "bb": bb, "a_w": a_w, "sb_w": sb_w, "stacked": torch.cat([w, a_w]), "n": n}


def step(impl: str, layer: dict[str, Any], x: Any, g: Any) -> None:
    """Forward and backward of one layer by implementation."""
    w, b, a, bb = layer["w"], layer["b"], layer["a"], layer["bb"]
    if impl == "base":
        y = F.linear(x, w, b)
    elif impl == "peft":
        y = F.linear(x, w, b) + F.linear(F.linear(x, a.to(x.dtype)), bb.to(x.dtype)) * SCALING
    elif impl == "addmm":
        y = AddmmLoraFunction.apply(x, w, b, a, bb, None, None, SCALING)
    elif impl == "stacked" and b is None and w.shape[1] > w.shape[0]:
        y = StackedLoraFunction.apply(x, a, bb, layer["stacked"], layer["sb_w"], SCALING)
    else:
        y = LoraLinearFunction.apply(x, w, b, a, bb, layer["a_w"], layer["sb_w"], SCALING)
    y.backward(g)


def time_lora(tokens: int, iters: int, dev: str) -> dict[str, Any]:
    """Milliseconds per forward + backward, per shape and summed over the 7 shapes, for each implementation."""
    layers = {name: make_layer(*shape, dev) for name, shape in SHAPES.items()}
    xs = {
        name: torch.randn(tokens, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
        for name, (k, _, _) in SHAPES.items()
    }
    gs = {name: torch.randn(tokens, n, device=dev, dtype=torch.bfloat16) for name, (_, n, _) in SHAPES.items()}
    out: dict[str, Any] = {}
    for impl in ("base", "peft", "addmm", "fused", "stacked"):
        per: dict[str, float] = {}
        for name in SHAPES:
            for _ in range(3):
                step(impl, layers[name], xs[name], gs[name])
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                step(impl, layers[name], xs[name], gs[name])
            end.record()
            torch.cuda.synchronize()
            per[name] = round(start.elapsed_time(end) / iters, 4)
        out[impl] = {
            "ms_layer_set": round(sum(per.values()), 3),
            "ms_model_24_layers": round(24 * sum(per.values()), 2),
        } | per
        print(tokens, impl, json.dumps(out[impl]), flush=True)
    return out


def norm_impls() -> dict[str, Any]:
    """RMSNorm implementations by name: module factories for a [*, 896] input."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    impls: dict[str, Any] = {"hf": lambda: Qwen2RMSNorm(896, eps=1e-6)}
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        impls["liger"] = lambda: LigerRMSNorm(
            896, eps=1e-6, offset=0.0, casting_mode="llama", init_fn="ones", in_place=False
        )
    except ImportError:
        pass

    class Native(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(896))

        def forward(self, x: Any) -> Any:
            return F.rms_norm(x, (896,), self.weight, 1e-6)

    impls["native"] = Native
    return impls


def time_norms(tokens: int, iters: int, dev: str) -> dict[str, Any]:
    """GPU ms per forward + backward at [tokens, 896] and host us per call at [64, 896]."""
    out = {}
    for name, make in norm_impls().items():
        mod = make().to(dev, torch.bfloat16)
        row = {}
        for label, t in (("gpu", tokens), ("host", 64)):
            x = torch.randn(t, 896, device=dev, dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn(t, 896, device=dev, dtype=torch.bfloat16)
            for _ in range(5):
                mod(x).backward(g)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters * 5):
                mod(x).backward(g)
            end.record()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            if label == "gpu":
                row["gpu_ms_fwd_bwd"] = round(start.elapsed_time(end) / (iters * 5), 4)
            else:
                row["host_us_fwd_bwd"] = round(1e6 * (t1 - t0) / (iters * 5), 1)
        from torch.profiler import ProfilerActivity, profile

        x = torch.randn(tokens, 896, device=dev, dtype=torch.bfloat16, requires_grad=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            mod(x).backward(torch.ones_like(x))
            torch.cuda.synchronize()
        row["kernels"] = sorted({e.name[:60] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
        out[name] = row
        print(tokens, "norm", name, json.dumps(row), flush=True)
    return out


def main() -> int:
    """Time the implementations and print JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="8192,32768")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for tokens in (int(t) for t in args.tokens.split(",")):
        result[f"lora@{tokens}"] = time_lora(tokens, args.iters, "cuda")
        result[f"norm@{tokens}"] = time_norms(tokens, args.iters, "cuda")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
