"""Run the service's training path exactly as a task runs it, and print throughput per strategy.

Usage: python bench/service_train.py --model DIR [--random-init] [--steps 30] [--batch 8] [--strategies trl,lora]
`--random-init` builds random weights from DIR's config.json (plus its tokenizer), so a model shape can be
measured without its weights. The data are synthetic chats with long-tailed lengths (median about 400 tokens).
Writes the table as JSON with --json-out.
"""

import argparse
import gc
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from entity.task import TaskKind, TaskStatus
from entity.train import TrainRequest
from service.tasks import TaskStore
from service.train.service import task_request
from service.worker import run_task
from util.settings import load_settings

WORDS = "the model learns to answer questions about data training speed memory tokens batch loss".split()


def synthetic_chats(n: int, seed: int) -> list[dict]:
    """Chats whose total length is log-normal around ~400 words, capped near 2000."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        total = min(2000, max(16, int(rng.lognormvariate(math.log(400), 0.7))))
        prompt = max(4, total // 4)
        chats.append(
            {
                "messages": [
                    {"role": "user", "content": " ".join(rng.choices(WORDS, k=prompt))},
                    {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=total - prompt))},
                ]
            }
        )
    return chats


def build_random_model(src: Path, dst: Path) -> Path:
    """Random weights with src's config, plus src's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def build_qwen_05b(tokenizer_dir: Path, out: Path) -> Path:
    """A Qwen2-0.5B-shaped model with random weights (the tokenizer's vocabulary), saved in bf16."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_one(work: Path, model: Path, strategy: str, steps: int, batch: int, max_length: int) -> dict:
    """Submit one train task to a fresh store and run it in this process, as the worker would."""
    settings = load_settings(
        None,
        {
            "paths": {"data_dir": work / "data", "model_dir": work / "models", "db_path": work / f"{strategy}.db"},
            "train": {"max_length": max_length, "save_steps": 10**9},
        },
    )
    store = TaskStore(settings.database_url)
    req = TrainRequest.model_validate(
        {
            "strategy": strategy,
            "dataset_path": str(work / "data" / "train.jsonl"),
            "config": {
                "max_steps": steps,
                "per_device_train_batch_size": batch,
                "learning_rate": 1e-4,
                "lora_config": {"r": 16, "lora_alpha": 32},
            },
        }
    )
    out = work / "models" / "outputs" / strategy
    request = task_request(req, Path(req.dataset_path), None, model, out)
    task = store.create(TaskKind.train, request, str(out))
    store.transition(task.id, TaskStatus.running, (TaskStatus.queued,))
    gc.collect()  # free the previous strategy's model so its memory is not counted in this peak
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    code = run_task(settings, task.id)
    wall = time.perf_counter() - started
    row = store.get(task.id)
    if code != 0:
        raise RuntimeError(f"{strategy} failed: {row.error}")
    metrics = row.metrics or {}
    return {
        "strategy": strategy,
        "steps": metrics.get("global_step"),
        "real_tokens": metrics.get("num_input_tokens_seen"),
        "train_runtime_s": round(metrics.get("train_runtime", 0.0), 2),
        "tokens_per_s": round(
            metrics.get("num_input_tokens_seen", 0) / max(metrics.get("train_runtime", 1e-9), 1e-9), 1
        ),
        "task_wall_s": round(wall, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "final_loss": metrics.get("final_loss"),
    }


def main() -> int:
    """Parse arguments, run each strategy, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--strategies", default="trl,lora")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_random_model(args.model, work / "model") if args.random_init else args.model.resolve()
        (work / "data").mkdir()
        with (work / "data" / "train.jsonl").open("w") as fh:
            for chat in synthetic_chats(args.records, seed=0):
                fh.write(json.dumps(chat) + "\n")
        rows = [run_one(work, model, s, args.steps, args.batch, args.max_length) for s in args.strategies.split(",")]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"\nservice training path on {device}, batch {args.batch}, {args.steps} steps (padded batches)")
    cols = list(rows[0])
    print(" | ".join(f"{c:>15}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]!s:>15}" for c in cols))
    if args.json_out:
        args.json_out.write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
