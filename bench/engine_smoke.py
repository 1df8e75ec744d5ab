"""Engine smoke test and profile on the current device: tok/s of N concurrent requests, CUDA graphs off/auto/on.

Usage: python bench/engine_smoke.py [--shape qwen0.5b] [--users 1,64] [--max-tokens 64] [--profile]
       [--configs varlen:true,sdpa:true] [--check-kernel]
Builds the shape with random weights (as bench/serving.py), runs the engine in-process and prints one row per
(attention:cuda_graphs, users): tok/s, decode steps, ms per step, and whether the greedy tokens equal those of the
first config; with --profile, the torch profiler's top CUDA/CPU ops; with --check-kernel (CUDA), the varlen kernel
against the per-request reference first.
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
    parser.add_argument("--configs", default="varlen:true,sdpa:true", help="attention:graphs pairs")
    parser.add_argument("--check-kernel", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    if args.check_kernel and cuda:
        check_kernel()
    with tempfile.TemporaryDirectory() as tmp:
        path = build(args.shape, Path(tmp) / "m")
        tok = AutoTokenizer.from_pretrained(path)
        dtype = torch.bfloat16 if cuda else torch.float32
        prompts = [
            tok(tok.apply_chat_template([{"role": "user", "content": question(i)}], tokenize=False,
                add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            for i in range(256)
        ]  # fmt: skip
        reference: dict[int, list[list[int]]] = {}
        for config in args.configs.split(","):
            attention, graphs = config.split(":")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda" if cuda else "cpu").eval()
            setting = {"none": None, "true": True, "false": False}[graphs]
            engine_config = EngineConfig(max_running=256, cuda_graphs=setting, attention=attention)
            engine = Engine(model, tok, {tok.eos_token_id}, engine_config)
            started = time.perf_counter()
            engine.start()
            load = time.perf_counter() - started
            cb = engine.manager.continuous_batching_config
            step_tokens = engine.manager.batch_processor.cache.max_batch_tokens
            print(
                f"{config}: start {load:.1f}s, attn={model.config._attn_implementation}, "
                f"use_cuda_graph={cb.use_cuda_graph}, max_batch_tokens={step_tokens}, "
                f"graphs captured={len(engine.manager.batch_processor.inputs_and_outputs.graphs._storage)}",
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
                answers = [d.token_ids for d in done]
                if users in reference:
                    same = sum(a == b for a, b in zip(answers, reference[users], strict=True))
                    first = next(
                        (i for i, (a, b) in enumerate(zip(answers[0], reference[users][0], strict=False)) if a != b),
                        None,
                    )
                    same = f"{same}/{users} (request 0 first differs at token {first})"
                else:
                    reference[users], same = answers, "reference"
                print(
                    f"  users={users}: {tokens / seconds:,.0f} tok/s, {steps} steps, "
                    f"{seconds / steps * 1000:.2f} ms/step, greedy answers equal to the first config's: {same}",
                    flush=True,
                )
                if args.profile and users == max(int(u) for u in args.users.split(",")) and graphs == "true":
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


def check_kernel() -> None:
    """The CUDA varlen kernel against the per-request reference (bf16 in, fp32 reference), decode- and chunk-shaped."""
    from service.engine import attention

    torch.manual_seed(0)
    for lens_q, lens_k in [([1] * 8, [37, 300, 5, 1, 1000, 64, 2, 129]), ([40, 1, 0, 17], [40, 90, 0, 300])]:
        heads, kv_heads, dim = 14, 2, 64
        q = torch.randn(sum(lens_q) + 5, heads, dim, device="cuda", dtype=torch.bfloat16)  # + padding tokens
        k, v = (torch.randn(sum(lens_k) + 9, kv_heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        got = attention.varlen_attention(q, k, v, cu_q, cu_k, dim**-0.5).float()
        want = attention.varlen_reference(q.float().cpu(), k.float().cpu(), v.float().cpu(), cu_q.cpu(), cu_k.cpu(),
                                          dim**-0.5)  # fmt: skip
        real = int(cu_q[-1])
        err = (got[:real].cpu() - want[:real]).abs().max().item()
        print(f"varlen kernel vs reference, q {lens_q} k {lens_k}: max abs error {err:.4f}", flush=True)


if __name__ == "__main__":
    main()
