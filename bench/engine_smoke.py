"""Engine smoke test and profile on the current device: tok/s of N concurrent requests, CUDA graphs off/auto/on.

Usage: python bench/engine_smoke.py [--shape qwen0.5b] [--users 1,64] [--max-tokens 64] [--profile]
Builds the shape with random weights (as bench/serving.py), runs the engine in-process and prints one row per
(cuda_graphs, users): tok/s, decode steps, ms per step; with --profile, the torch profiler's top CUDA/CPU ops.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from serving import build, question

from service.engine import Engine, EngineConfig, SamplingParams


def main() -> None:
    """Build, then time each graph setting and user count."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen0.5b")
    parser.add_argument("--users", default="1,64")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--graphs", default="none,true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        path = build(args.shape, Path(tmp) / "m")
        tok = AutoTokenizer.from_pretrained(path)
        dtype = torch.bfloat16 if cuda else torch.float32
        prompts = [
            tok(tok.apply_chat_template([{"role": "user", "content": question(i)}], tokenize=False,
                add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            for i in range(256)
        ]  # fmt: skip
        reference = None
        for graphs in args.graphs.split(","):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda" if cuda else "cpu").eval()
            setting = {"none": None, "true": True, "false": False}[graphs]
            engine = Engine(model, tok, {tok.eos_token_id}, EngineConfig(max_running=256, cuda_graphs=setting))
            started = time.perf_counter()
            engine.start()
            load = time.perf_counter() - started
            cb = engine.manager.continuous_batching_config
            step_tokens = engine.manager.batch_processor.cache.max_batch_tokens
            print(
                f"graphs={graphs}: start {load:.1f}s, attn={model.config._attn_implementation}, "
                f"use_cuda_graph={cb.use_cuda_graph}, max_batch_tokens={step_tokens}",
                flush=True,
            )
            for users in [int(u) for u in args.users.split(",")]:
                params = [SamplingParams(max_tokens=args.max_tokens) for _ in range(users)]
                engine.generate(prompts[:users], [SamplingParams(max_tokens=4) for _ in range(users)])
                before = engine.counters()["decode_steps"]
                start = time.perf_counter()
                done = engine.generate(prompts[:users], params)
                seconds = time.perf_counter() - start
                steps = engine.counters()["decode_steps"] - before
                tokens = sum(len(d.token_ids) for d in done)
                if users == 1:
                    same = reference is None or reference == done[0].token_ids
                    reference = reference or done[0].token_ids
                else:
                    same = "-"
                print(
                    f"  users={users}: {tokens / seconds:,.0f} tok/s, {steps} steps, "
                    f"{seconds / steps * 1000:.1f} ms/step, same tokens as first setting: {same}",
                    flush=True,
                )
                if args.profile and users == max(int(u) for u in args.users.split(",")):
                    from torch.profiler import ProfilerActivity, profile

                    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                    with profile(activities=acts) as prof:
                        engine.generate(prompts[:users], [SamplingParams(max_tokens=16) for _ in range(users)])
                    key = "cuda_time_total" if cuda else "cpu_time_total"
                    print(prof.key_averages().table(sort_by=key, row_limit=15), flush=True)
                    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12), flush=True)
            engine.close()
            del engine, model
            if cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
