"""Memory and throughput of base + N LoRA adapters served on one copy of the base weights (per-token routing).

Usage: python bench/adapters.py [--model DIR] [--random-0.5b] [--counts 0,1,3,8] [--rank 8] [--merged-max 3]
       [--throughput] [--users 32] [--max-tokens 64] [--json-out FILE]

On the current device (CUDA when present), through the server's model cache:
- memory: for each N, the unique bytes of parameter storage (base + the routed LoRA stacks), the process RSS and,
  with CUDA, the allocated GPU memory; for N <= --merged-max also the old path (each adapter merged into its own
  copy of the base, `share_adapters=False`);
- with --throughput: aggregate tok/s of `--users` concurrent greedy requests, each exactly --max-tokens long, on the
  bare base, all on one adapter, and spread round-robin over the N adapters (mixed steps); `alone_equal` says how
  many of the first 4 requests, run again alone, gave the same tokens as in the shared batch.
Adapters are random rank-r all-linear LoRAs (non-zero B), so answers are noise; lengths are fixed by max_tokens.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from service.engine import EngineConfig, SamplingParams
from service.models import ModelCache, pick_device, render_chat
from util.settings import PROJECT_ROOT

MIB = 1024 * 1024


def rss_mib() -> float:
    """Resident memory of this process (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def unique_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind some tensors."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def make_adapters(base: Path, n: int, rank: int, out: Path) -> list[Path]:
    """N random all-linear LoRA adapters of `base` (different seeds), saved like LoRA train outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if n == 0:
        return []
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    paths = []
    for i in range(n):
        torch.manual_seed(100 + i)
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.data.normal_(0, 0.02)
        path = out / f"adapter-{i}"
        peft.save_pretrained(path)
        paths.append(path)
    return paths


def sync() -> None:
    """Wait for queued device work before reading a clock or a memory counter."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def memory_row(base: Path, adapters: list[Path], shared: bool) -> dict[str, Any]:
    """Load the base and the adapters through a model cache; report what they hold."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    gpu_before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    cache = ModelCache(len(adapters) + 1, EngineConfig(max_running=8, max_waiting=8), share_adapters=shared)
    try:
        loaded = [cache.get(base)] + [cache.get(p) for p in adapters]
        tensors: list[torch.Tensor] = []
        for m in loaded:
            tensors += list(m.model.parameters()) + list(m.model.buffers())
            if m.engine is not None:
                tensors += m.engine.lora.tensors()
        sync()
        row = {
            "path": "shared" if shared else "merged",
            "adapters": len(adapters),
            "param_mib": round(unique_bytes(tensors) / MIB, 1),
            "model_loads": cache.loads,
            "rss_mib": round(rss_mib(), 1),
        }
        if torch.cuda.is_available():
            row["gpu_alloc_mib"] = round((torch.cuda.memory_allocated() - gpu_before) / MIB, 1)
        return row
    finally:
        cache.close()


def throughput(base: Path, adapters: list[Path], users: int, max_tokens: int) -> list[dict[str, Any]]:
    """Aggregate tok/s of `users` requests on the bare base, on one adapter, and spread over all adapters."""
    cache = ModelCache(1, EngineConfig(max_running=max(users, 1), max_waiting=users))
    rows = []
    try:
        loaded = cache.get(base)
        for p in adapters:
            cache.get(p)
        engine = loaded.engine
        texts = [f"Write a long story about the number {i}." for i in range(users)]
        prompts = [
            loaded.tokenizer(
                render_chat(loaded.tokenizer, [{"role": "user", "content": t}], add_generation_prompt=True),
                add_special_tokens=False,
            )["input_ids"]
            for t in texts
        ]
        # No end-of-sequence: every request decodes exactly max_tokens tokens.
        eos, engine.eos_ids = engine.eos_ids, set()
        cases = {"base only": [None] * users}
        if adapters:
            cases["one adapter"] = [str(adapters[0])] * users
            cases[f"mixed over {len(adapters)}"] = [str(adapters[i % len(adapters)]) for i in range(users)]
        for label, routes in cases.items():
            warm = [SamplingParams(max_tokens=4, adapter=a) for a in routes]
            engine.generate(prompts, warm)
            before = engine.counters()
            sync()
            start = time.perf_counter()
            done = engine.generate(prompts, [SamplingParams(max_tokens=max_tokens, adapter=a) for a in routes])
            sync()
            seconds = time.perf_counter() - start
            after = engine.counters()
            tokens = sum(len(d.token_ids) for d in done)
            # Routing check: the first requests alone must give the tokens they got in the shared batch.
            check = range(min(4, users))
            alone = [
                engine.generate([prompts[i]], [SamplingParams(max_tokens=max_tokens, adapter=routes[i])])[0]
                for i in check
            ]
            same = sum(alone[j].token_ids == done[i].token_ids for j, i in enumerate(check))
            rows.append(
                {
                    "case": label,
                    "users": users,
                    "tokens": tokens,
                    "seconds": round(seconds, 2),
                    "tok_s": round(tokens / seconds, 1),
                    "decode_steps": after["decode_steps"] - before["decode_steps"],
                    "mixed_steps": after["mixed_steps"] - before["mixed_steps"],
                    "alone_equal": f"{same}/{len(check)}",
                }
            )
        engine.eos_ids = eos
    finally:
        cache.close()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of dict rows."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    """Run the measurements and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(PROJECT_ROOT / "model" / "base" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--random-0.5b", dest="random_05b", action="store_true")
    parser.add_argument("--counts", default="0,1,3,8")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--merged-max", type=int, default=3)
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    device, dtype = pick_device()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.model).resolve()
        if args.random_05b:
            from service_train import build_qwen_05b

            base = build_qwen_05b(base, Path(tmp) / "qwen-0.5b-shape")
        adapters = make_adapters(base, max(counts), args.rank, Path(tmp))
        print(f"device {device} ({dtype}), base {base.name}, rank-{args.rank} all-linear adapters", flush=True)
        memory = []
        for n in counts:
            memory.append(memory_row(base, adapters[:n], shared=True))
            print(memory[-1], flush=True)
        for n in counts:
            if 0 < n <= args.merged_max:
                memory.append(memory_row(base, adapters[:n], shared=False))
                print(memory[-1], flush=True)
        print("\n" + table(memory))
        speed = throughput(base, adapters, args.users, args.max_tokens) if args.throughput else []
        if speed:
            print("\n" + table(speed))
    result = {"device": device, "dtype": dtype, "rank": args.rank, "memory": memory, "throughput": speed}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
