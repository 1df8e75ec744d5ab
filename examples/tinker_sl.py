r"""Supervised fine-tuning with tinker-cookbook's own training loop, against this server through the Tinker SDK.

The cookbook's recipes fetch Hub datasets; this drives its library code (renderer, FromConversationFileBuilder,
supervised.train) with local chat records instead:

    python examples/tinker_sl.py --base-url http://127.0.0.1:8000 --api-key tml-<key> \
        --model SmolLM2-135M-Instruct --tokenizer model/base/SmolLM2-135M-Instruct --steps 5
"""

import argparse
import asyncio
import json
import os
from pathlib import Path

from tinker_cookbook.supervised import train
from tinker_cookbook.supervised.data import FromConversationFileBuilder
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig
from tinker_cookbook.tokenizer_utils import register_tokenizer
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent


def to_messages_jsonl(source: Path, target: Path) -> int:
    """Write our chat records ({"conversations": [...]} or {"messages": [...]}) as the cookbook's JSONL."""
    records = json.loads(source.read_text(encoding="utf-8"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as f:
        for record in records:
            messages = record.get("messages") or record.get("conversations")
            f.write(json.dumps({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}) + "\n")
    return len(records)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default=os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:8000"))
    p.add_argument("--api-key", default=os.environ.get("TINKER_API_KEY", "tml-local"), help="tml-<one of our keys>")
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="a base model the server lists")
    p.add_argument("--tokenizer", default=str(ROOT / "model" / "base" / "SmolLM2-135M-Instruct"), help="its tokenizer")
    p.add_argument("--data", default=str(ROOT / "test" / "data" / "train_sample.json"))
    p.add_argument("--renderer", default="qwen3_instruct", help="a cookbook renderer (ChatML fits SmolLM2)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--log-path", default="/tmp/tinker_sl")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Run the cookbook's supervised loop for a few steps; return its log folder (metrics.jsonl)."""
    args = parse_args(argv)
    os.environ["TINKER_API_KEY"] = args.api_key
    log_path = Path(args.log_path)
    data = log_path / "conversations.jsonl"
    print(f"{to_messages_jsonl(Path(args.data), data)} conversations from {args.data}")
    register_tokenizer(args.model, lambda: AutoTokenizer.from_pretrained(args.tokenizer))
    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=args.model, renderer_name=args.renderer, max_length=512, batch_size=args.batch_size
    )
    config = train.Config(
        log_path=str(log_path),
        model_name=args.model,
        recipe_name="tinker_sl",
        renderer_name=args.renderer,
        dataset_builder=FromConversationFileBuilder(file_path=str(data), common_config=common),
        learning_rate=args.lr,
        lr_schedule="constant",
        num_epochs=100,
        lora_rank=args.rank,
        base_url=args.base_url,
        max_steps=args.steps,
        save_every=args.steps,
        eval_every=0,
        ttl_seconds=None,
    )
    asyncio.run(train.main(config))
    return log_path


if __name__ == "__main__":
    main()
