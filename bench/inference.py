"""Measure inference through the service path against plain transformers.generate, in one run.

Usage: python bench/inference.py [--model DIR] [--random-0.5b] [--max-tokens 128] [--batch 32]
       [--json-out FILE]

Measures on the current device (CUDA when present):
- single-stream decode tokens/s: plain `model.generate` (the baseline) and the service's chat;
- time to first token of the service's SSE stream (median of 5);
- batch-N tokens/s: plain batched `generate` (baseline), the service's /batch, and a loop of N single chats;
`--random-0.5b` builds a Qwen2-0.5B-shaped model with random weights (SmolLM2's tokenizer and vocabulary),
so decode lengths are fixed by max_tokens rather than by the model choosing to stop.
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from service_train import build_qwen_05b

from entity.inference import ChatRequest
from service.inference import InferenceService
from service.models import ModelCache, pick_device
from service.tasks import TaskStore
from util.settings import PROJECT_ROOT, load_settings

TOPICS = "rivers mountains compilers gardens trains oceans violins bridges deserts comets".split()


def prompts(n: int) -> list[str]:
    """N distinct questions of similar length."""
    return [f"Write a short story about {TOPICS[i % 10]} and {TOPICS[(i * 3 + 1) % 10]}, number {i}." for i in range(n)]


def sync() -> None:
    """Wait for queued device work before reading a host clock."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def plain_generate(service: InferenceService, texts: list[str], max_tokens: int) -> tuple[int, float]:
    """The baseline: left-padded `model.generate`, greedy, exactly max_tokens new tokens; (tokens, seconds)."""
    loaded = service.cache.get(service.settings.base_model_path())
    tok = loaded.tokenizer
    rendered = [
        tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]
    enc = tok(rendered, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    enc = {k: v.to(loaded.device) for k, v in enc.items()}
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(
            **enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    sync()
    return (out.shape[1] - enc["input_ids"].shape[1]) * len(texts), time.perf_counter() - start


def request(text: str, max_tokens: int) -> ChatRequest:
    """A greedy chat request."""
    return ChatRequest(messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0)


async def service_single(service: InferenceService, text: str, max_tokens: int) -> tuple[int, float]:
    """One service chat; (completion tokens, seconds)."""
    start = time.perf_counter()
    result = await service.chat(request(text, max_tokens))
    return result.usage.completion_tokens, time.perf_counter() - start


async def service_ttft(service: InferenceService, text: str, max_tokens: int) -> float:
    """Time to the first streamed piece, in ms."""
    row = await service.prepare_async(request(text, max_tokens))
    start = time.perf_counter()
    first = None
    async for event in service.stream(row):
        if first is None and event["type"] == "delta":
            first = (time.perf_counter() - start) * 1000
    return first if first is not None else float("nan")


async def service_batch(service: InferenceService, texts: list[str], max_tokens: int) -> tuple[int, float, int]:
    """One /batch call; (completion tokens, seconds, generate calls)."""
    start = time.perf_counter()
    body = [request(t, max_tokens).model_dump() for t in texts]
    result = await service.batch(body)
    tokens = sum(item.result.usage.completion_tokens for item in result.results if item.result)
    return tokens, time.perf_counter() - start, result.generate_calls


async def service_loop(service: InferenceService, texts: list[str], max_tokens: int) -> tuple[int, float]:
    """N sequential single chats; (completion tokens, seconds)."""
    start = time.perf_counter()
    tokens = 0
    for t in texts:
        tokens += (await service.chat(request(t, max_tokens))).usage.completion_tokens
    return tokens, time.perf_counter() - start


async def measure(service: InferenceService, args: argparse.Namespace, label: str) -> list[dict[str, Any]]:
    """Every service row for one configuration (after warm-up calls that also trigger any compilation)."""
    texts = prompts(args.batch)
    rows: list[dict[str, Any]] = []
    warm = time.perf_counter()
    await service_single(service, texts[0], args.max_tokens)
    await service_batch(service, texts, args.max_tokens)
    rows.append({"row": f"{label}: warm-up (first calls)", "seconds": round(time.perf_counter() - warm, 2)})
    singles = [await service_single(service, texts[i % len(texts)], args.max_tokens) for i in range(3)]
    tps = statistics.median(n / s for n, s in singles)
    rows.append({"row": f"{label}: single-stream decode", "tokens_per_s": round(tps, 1), "tokens": singles[0][0]})
    ttfts = [await service_ttft(service, texts[i % len(texts)], args.max_tokens) for i in range(5)]
    rows.append({"row": f"{label}: time to first token (ms, median of 5)", "ms": round(statistics.median(ttfts), 1)})
    n, s, calls = await service_batch(service, texts, args.max_tokens)
    rows.append(
        {"row": f"{label}: batch-{args.batch} (/batch)", "tokens_per_s": round(n / s, 1), "generate_calls": calls}
    )
    n, s = await service_loop(service, texts, args.max_tokens)
    rows.append({"row": f"{label}: loop of {args.batch} single chats", "tokens_per_s": round(n / s, 1)})
    return rows


def make_service(model_dir: Path, name: str, work: Path) -> InferenceService:
    """An InferenceService as the server builds it, on a throwaway store."""
    settings = load_settings(
        None,
        {
            "paths": {"data_dir": work / "data", "model_dir": model_dir, "db_path": work / "tasks.db"},
            "models": {"base_model": name},
            "inference": {"max_tokens_limit": 4096, "max_batch_size": 256},
        },
    )
    return InferenceService(settings, TaskStore(settings.database_url), ModelCache(1))


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run every measurement and return the table rows."""
    work = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    src = Path(args.model)
    if args.random_05b:
        model_dir, name = work / "models", "qwen2-0.5b-random"
        build_qwen_05b(src, model_dir / "base" / name)
    else:
        model_dir, name = src.parent.parent, src.name
    service = make_service(model_dir, name, work)
    texts = prompts(args.batch)
    plain_generate(service, texts[:1], 8)  # load and warm up both shapes
    plain_generate(service, texts, 8)
    rows: list[dict[str, Any]] = []
    singles = [plain_generate(service, texts[i : i + 1], args.max_tokens) for i in range(3)]
    base_b1 = statistics.median(n / s for n, s in singles)
    rows.append({"row": "plain generate: single-stream decode (baseline)", "tokens_per_s": round(base_b1, 1)})
    n, s = plain_generate(service, texts, args.max_tokens)
    base_bn = n / s
    rows.append({"row": f"plain generate: batch-{args.batch} (baseline)", "tokens_per_s": round(base_bn, 1)})
    rows += await measure(service, args, "service")
    for row in rows:
        if "tokens_per_s" in row:
            base = base_b1 if ("single" in row["row"] and "loop" not in row["row"]) else base_bn
            row["vs_baseline"] = round(row["tokens_per_s"] / base, 2)
    return rows


def main() -> None:
    """Parse arguments, run, print the table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(PROJECT_ROOT / "model" / "base" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--random-0.5b", dest="random_05b", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    device, dtype = pick_device()
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    rows = asyncio.run(main_async(args))
    model = "Qwen2-0.5B shape, random weights" if args.random_05b else Path(args.model).name
    print(f"\ninference bench: {model}, {gpu} ({dtype}), greedy, max_tokens={args.max_tokens}, batch={args.batch}")
    print(f"{'measurement':58} {'tokens/s':>10} {'vs base':>8}  other")
    for row in rows:
        other = {k: v for k, v in row.items() if k not in ("row", "tokens_per_s", "vs_baseline")}
        tps = f"{row['tokens_per_s']:,.1f}" if "tokens_per_s" in row else ""
        ratio = f"{row['vs_baseline']:.2f}x" if "vs_baseline" in row else ""
        print(f"{row['row']:58} {tps:>10} {ratio:>8}  {other or ''}")
    if args.json_out:
        meta = {"model": model, "device": gpu, "dtype": dtype, "max_tokens": args.max_tokens, "batch": args.batch}
        Path(args.json_out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
