"""DPO on the real SmolLM2-135M-Instruct through the service's dpo strategy: preference accuracy before and after.

Usage: python bench/dpo_smollm2.py [--data test/data/preference_sample.jsonl] [--epochs 3] [--batch 4] [--lr 5e-4]
Preference accuracy is the share of records whose preferred answer has the higher summed log-probability under
the model (the DPO objective's direction, without a reference). The numbers are on the training records: the
sample is small, so this shows that training moves the model, not that it generalises.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from entity.train import LoraConfigIn, TrainConfig, TrainRequest
from service import models
from service.data import load_preferences
from service.train.runner import build_trainer
from service.train.service import task_request
from util.settings import PROJECT_ROOT, load_settings


def answer_logprob(model: torch.nn.Module, tokenizer: object, prompt: list, answer: list) -> float:
    """Summed log-probability of the answer's tokens after the chat-templated prompt."""
    head = models.render_chat(tokenizer, prompt, add_generation_prompt=True)
    full = models.render_chat(tokenizer, prompt + answer)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logp = torch.log_softmax(logits[0, :-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logp[len(head_ids) - 1 :].sum())


def preference_accuracy(model: torch.nn.Module, tokenizer: object, records: list[dict]) -> tuple[float, float]:
    """(share of records where chosen beats rejected, mean log-prob margin)."""
    margins = [
        answer_logprob(model, tokenizer, r["prompt"], r["chosen"])
        - answer_logprob(model, tokenizer, r["prompt"], r["rejected"])
        for r in records
    ]
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def main() -> None:
    """Train and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=PROJECT_ROOT / "test" / "data" / "preference_sample.jsonl")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    args = parser.parse_args()
    settings = load_settings()
    model_path = settings.base_model_path()
    records = load_preferences(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            per_device_train_batch_size=args.batch,
            learning_rate=args.lr,
            num_train_epochs=args.epochs,
            beta=args.beta,
            lora_config=LoraConfigIn(),
            save_steps=10_000,
        )
        req = TrainRequest(strategy="dpo", dataset_path=str(args.data), config=config)
        request = task_request(req, args.data, None, model_path, Path(tmp), 1, "ddp")
        built = build_trainer(settings, None, "dpo-bench", request)
        model, tok = built.trainer.model, built.tokenizer
        model.eval()
        before = preference_accuracy(model, tok, records)
        started = time.monotonic()
        built.trainer.train()
        seconds = time.monotonic() - started
        model.eval()
        after = preference_accuracy(model, tok, records)
    logs = [r for r in built.trainer.state.log_history if "rewards/accuracies" in r]
    table = {
        "model": model_path.name,
        "device": built.device,
        "records": len(records),
        "steps": built.trainer.state.global_step,
        "train_seconds": round(seconds, 1),
        "preference_accuracy_before": before[0],
        "preference_accuracy_after": after[0],
        "mean_logp_margin_before": round(before[1], 3),
        "mean_logp_margin_after": round(after[1], 3),
        "reward_accuracy_first_step": logs[0]["rewards/accuracies"] if logs else None,
        "reward_accuracy_last_step": logs[-1]["rewards/accuracies"] if logs else None,
        "reward_margin_first_step": logs[0]["rewards/margins"] if logs else None,
        "reward_margin_last_step": logs[-1]["rewards/margins"] if logs else None,
    }
    width = max(len(k) for k in table)
    for key, value in table.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
