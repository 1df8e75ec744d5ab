"""Serving benchmark: the real server (uvicorn via main.py) under N concurrent /v1/chat/completions users.

Usage: python bench/serving.py [--shapes smollm2,qwen0.5b] [--users 1,8,32,64,256] [--max-tokens 128]
       [--modes plain,stream] [--requests-per-user 2] [--baseline-batches 1,32] [--json-out FILE]

For each model shape (random weights, SmolLM2's tokenizer, so answers run to max_tokens):
- the baseline first, in this process: plain `model.generate` at batch 1 and batch 32 (greedy, fixed length);
- then the server on the current device (CUDA when present), driven by N concurrent HTTP users, each sending
  `--requests-per-user` requests one after another, streamed and plain; /health is polled every 50 ms meanwhile.
Prints aggregate output tok/s, TTFT p50/p95 (streamed), latency p50/p95 and /health p99; writes the JSON too.
"""

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

TOKENIZER = ROOT / "model" / "base" / "SmolLM2-135M-Instruct"
TOPICS = "rivers mountains compilers gardens trains oceans violins bridges deserts comets".split()


def build(shape: str, out: Path) -> Path:
    """A model folder of the given shape with random weights and SmolLM2's tokenizer (saved in bf16)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    common = {
        "vocab_size": len(tok),
        "tie_word_embeddings": True,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    torch.manual_seed(0)
    if shape == "smollm2":
        cfg = LlamaConfig(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            **common,
        )
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Qwen2Config(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            **common,
        )
        model = Qwen2ForCausalLM(cfg)
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def question(i: int) -> str:
    """The i-th prompt: distinct, of similar length."""
    return f"Write a short story about {TOPICS[i % 10]} and {TOPICS[(i * 3 + 1) % 10]}, number {i}."


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank), or None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))], 1)


def baseline(model_dir: Path, batch: int, max_tokens: int) -> dict[str, Any]:
    """Plain `model.generate`, greedy, exactly max_tokens new tokens per row; aggregate tok/s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    texts = [
        tok.apply_chat_template([{"role": "user", "content": question(i)}], tokenize=False, add_generation_prompt=True)
        for i in range(batch)
    ]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(device)
    kw = {"max_new_tokens": max_tokens, "min_new_tokens": max_tokens, "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        model.generate(**enc, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(**enc, **kw)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    tokens = (out.shape[1] - enc["input_ids"].shape[1]) * batch
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"row": f"HF generate, batch {batch}", "tokens": tokens, "seconds": round(seconds, 2),
            "tok_s": round(tokens / seconds, 1)}  # fmt: skip


def start_server(
    work: Path, model_root: Path, name: str, max_running: int, engine: dict[str, Any]
) -> tuple[str, subprocess.Popen]:
    """`python main.py --config ... --port N` on this device; returns once /health answers."""
    import socket

    work.mkdir(parents=True, exist_ok=True)
    cfg = {
        "paths": {"data_dir": str(work / "data"), "model_dir": str(model_root), "db_path": str(work / "t.db")},
        "models": {"base_model": name},
        "inference": {
            "max_concurrent_generations": max_running,
            "max_waiting": 4096,
            "cache_size": 1,
            **engine,
        },
    }
    (work / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (work / "server.log").open("wb")
    cmd = [sys.executable, "main.py", "--config", str(work / "config.yaml"), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--log-level", "warning"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError((work / "server.log").read_text())
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start")


async def one_request(
    http: httpx.AsyncClient, url: str, name: str, i: int, max_tokens: int, stream: bool
) -> dict[str, Any]:
    """One chat completion; its latency, time to first token (streamed) and completion tokens."""
    body = {
        "model": name,
        "messages": [{"role": "user", "content": question(i)}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    start = time.perf_counter()
    first: float | None = None
    if not stream:
        r = await http.post(f"{url}/v1/chat/completions", json=body)
        r.raise_for_status()
        return {"latency": time.perf_counter() - start, "ttft": None, "tokens": r.json()["usage"]["completion_tokens"]}
    body["stream_options"] = {"include_usage": True}
    tokens = 0
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            data = json.loads(line[5:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            elif first is None and data["choices"] and data["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return {"latency": time.perf_counter() - start, "ttft": first, "tokens": tokens}


async def level(url: str, name: str, users: int, per_user: int, max_tokens: int, stream: bool) -> dict[str, Any]:
    """`users` concurrent clients, each sending `per_user` requests in turn; /health polled meanwhile."""
    limits = httpx.Limits(max_connections=users + 4, max_keepalive_connections=users + 4)
    health: list[float] = []
    done = asyncio.Event()

    async def poll(http: httpx.AsyncClient) -> None:
        while not done.is_set():
            start = time.perf_counter()
            await http.get(f"{url}/health")
            health.append((time.perf_counter() - start) * 1000)
            await asyncio.sleep(0.05)

    async def user(http: httpx.AsyncClient, u: int) -> list[dict[str, Any]]:
        return [await one_request(http, url, name, u * per_user + k, max_tokens, stream) for k in range(per_user)]

    async with httpx.AsyncClient(timeout=3600, limits=limits) as http, httpx.AsyncClient(timeout=60) as side:
        poller = asyncio.create_task(poll(side))
        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(user(http, u) for u in range(users))) for r in rs]
        wall = time.perf_counter() - start
        done.set()
        await poller
        counters = (await side.get(f"{url}/health")).json()["inference"]
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] * 1000 for r in results if r["ttft"] is not None]
    lats = [r["latency"] * 1000 for r in results]
    return {
        "users": users,
        "mode": "stream" if stream else "plain",
        "requests": len(results),
        "tokens": tokens,
        "seconds": round(wall, 2),
        "tok_s": round(tokens / wall, 1),
        "ttft_p50_ms": pct(ttfts, 50),
        "ttft_p95_ms": pct(ttfts, 95),
        "latency_p50_ms": pct(lats, 50),
        "latency_p95_ms": pct(lats, 95),
        "health_p99_ms": pct(health, 99),
        "decode_steps_total": counters.get("decode_steps"),
    }


def run_shape(shape: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Baseline and server levels for one model shape."""
    name = f"{shape}-random"
    root = work / "models"
    model_dir = build(shape, root / "base" / name)
    result: dict[str, Any] = {"shape": shape, "baseline": [], "levels": []}
    for batch in args.baseline_batches:
        result["baseline"].append(baseline(model_dir, batch, args.max_tokens))
        print(shape, result["baseline"][-1], flush=True)
    graphs = {"auto": None, "true": True, "false": False}[args.cuda_graphs]
    engine = {"cuda_graphs": graphs, "graph_kv_padding": args.kv_padding, "max_batch_tokens": args.max_batch_tokens}
    engine["engine_attention"] = None if args.attention == "auto" else args.attention
    url, proc = start_server(work / shape, root, name, args.max_running, engine)
    try:
        started = time.perf_counter()
        asyncio.run(level(url, name, 1, 1, 4, False))  # load the model and its engine (CUDA graphs: warm-up)
        result["load_s"] = round(time.perf_counter() - started, 1)
        for users in args.users:
            for mode in args.modes:
                row = asyncio.run(level(url, name, users, args.requests_per_user, args.max_tokens, mode == "stream"))
                result["levels"].append(row)
                print(shape, row, flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return result


def table(results: list[dict[str, Any]]) -> str:
    """A Markdown table of every row."""
    lines = [
        "| shape | row | users | tok/s | TTFT p50/p95 ms | latency p50/p95 ms | /health p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for b in res["baseline"]:
            lines.append(f"| {res['shape']} | {b['row']} | {b['row'].split()[-1]} | {b['tok_s']:,} | | | |")
        for r in res["levels"]:
            lines.append(
                f"| {res['shape']} | server, {r['mode']} | {r['users']} | {r['tok_s']:,} | "
                f"{r['ttft_p50_ms']}/{r['ttft_p95_ms']} | {r['latency_p50_ms']}/{r['latency_p95_ms']} | "
                f"{r['health_p99_ms']} |"
            )
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run every shape, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--shapes", default="smollm2,qwen0.5b", type=lambda s: s.split(","))
    parser.add_argument("--users", default="1,8,32,64,256", type=ints)
    parser.add_argument("--modes", default="stream,plain", type=lambda s: s.split(","))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests-per-user", type=int, default=2)
    parser.add_argument("--baseline-batches", default="1,32", type=ints)
    parser.add_argument("--max-running", type=int, default=256, help="inference.max_concurrent_generations")
    parser.add_argument("--cuda-graphs", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--kv-padding", type=int, help="inference.graph_kv_padding")
    parser.add_argument("--attention", default="auto", choices=["auto", "varlen", "sdpa"], help="engine_attention")
    parser.add_argument("--max-batch-tokens", type=int, help="inference.max_batch_tokens")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_shape(shape, args, Path(tmp)) for shape in args.shapes]
    print(f"\ndevice: {device}; {args.max_tokens} new tokens, greedy; cuda_graphs {args.cuda_graphs}\n")
    print(table(results))
    if args.json_out:
        payload = {
            "device": device,
            "max_tokens": args.max_tokens,
            "cuda_graphs": args.cuda_graphs,
            "kv_padding": args.kv_padding,
            "attention": args.attention,
            "max_batch_tokens": args.max_batch_tokens,
            "results": results,
        }
        args.json_out.write_text(json.dumps(payload, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
