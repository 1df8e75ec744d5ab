"""Rejection-sampling SFT through the low-level training API (Tinker-style), driven from the SDK.

1. Sample N answers per training problem with the run's current weights.
2. Check each answer's final number against the reference (a numeric final-answer verifier).
3. Train on the correct answers (forward_backward + optim_step, pipelined through futures).
4. Measure greedy held-out accuracy before training and after every round.

The problems are generated here from templates with a fixed seed: 100 for training, 40 held out.

Usage: python examples/rejection_sampling_sft.py [--base-url URL] [--api-key KEY] [--rounds 3] [--samples 4]
       [--train 100] [--heldout 40] [--max-tokens 128] [--json-out FILE]
"""

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdk import TrainingRun, TuningClient

SYSTEM = (
    "You are a careful math tutor. Solve the problem in one or two short sentences, "
    "then write the final answer as 'Answer: <number>'."
)
NAMES = ["Ava", "Ben", "Chloe", "Dan", "Ema", "Finn", "Gita", "Hugo", "Iris", "Jon"]
ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "shells", "cards"]
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def make_problems(n: int, seed: int) -> list[dict[str, Any]]:
    """Grade-school word problems with integer answers (one or two steps, small numbers)."""
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b, c = rng.randint(2, 20), rng.randint(2, 12), rng.randint(2, 9)
        kind = rng.randrange(5)
        if kind == 0:
            q, ans = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
        elif kind == 1:
            a = a + b
            q, ans = f"{name} had {a} {item} and gave away {b}. How many {item} are left?", a - b
        elif kind == 2:
            q, ans = f"{name} buys {c} bags with {b} {item} in each bag. How many {item} is that in total?", b * c
        elif kind == 3:
            q, ans = f"{name} shares {b * c} {item} equally among {c} friends. How many {item} does each get?", b
        else:
            q = f"{name} has {a} {item}, finds {b} more, then loses {c}. How many {item} does {name} have?"
            ans = a + b - c
        problems.append({"question": q, "answer": ans})
    return problems


def final_number(text: str) -> float | None:
    """The answer's number: the first number after the last 'answer', else the last number in the text."""
    idx = text.lower().rfind("answer")
    found = NUMBER.findall(text[idx:]) if idx >= 0 else []
    if not found:
        found = NUMBER.findall(text)[-1:]
    return float(found[0].replace(",", "")) if found else None


def is_correct(text: str, answer: int) -> bool:
    """The numeric verifier: the final number equals the reference."""
    value = final_number(text)
    return value is not None and abs(value - answer) < 1e-6


def conversation(problem: dict[str, Any]) -> list[dict[str, str]]:
    """The prompt of a problem."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": problem["question"]}]


def sample_all(
    run: TrainingRun, problems: list[dict[str, Any]], n: int, temperature: float, max_tokens: int, seed: int
) -> list[list[str]]:
    """N answers per problem; all sample calls are queued first, then collected."""
    chunk = 16
    futures = [
        run.sample(
            messages=[conversation(p) for p in problems[i : i + chunk]],
            num_samples=n,
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed + i,
        )
        for i in range(0, len(problems), chunk)
    ]
    answers: list[list[str]] = []
    for future in futures:
        for result in future.result()["results"]:
            answers.append([s["text"] for s in result["samples"]])
    return answers


def accuracy(run: TrainingRun, problems: list[dict[str, Any]], max_tokens: int) -> float:
    """Greedy held-out accuracy."""
    answers = sample_all(run, problems, 1, 0.0, max_tokens, seed=0)
    return sum(is_correct(a[0], p["answer"]) for a, p in zip(answers, problems, strict=True)) / len(problems)


def train_on(run: TrainingRun, examples: list[dict[str, Any]], lr: float, batch: int, epochs: int) -> list[float]:
    """SFT on the accepted answers; every step is queued before any result is read."""
    futures = []
    rng = random.Random(len(examples))
    for _ in range(epochs):
        order = examples[:]
        rng.shuffle(order)
        for i in range(0, len(order), batch):
            futures.append(run.forward_backward(order[i : i + batch]))
            run.optim_step(learning_rate=lr, weight_decay=0.0, max_grad_norm=1.0)
    return [f.result()["loss"] for f in futures]


def main() -> None:
    """Run the rounds and print the accuracy curve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=None)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--heldout", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    problems = make_problems(args.train + args.heldout, seed=7)
    train, heldout = problems[: args.train], problems[args.train :]
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with TuningClient(base_url=args.base_url, api_key=args.api_key, timeout=600) as client:
        run = client.runs.create(base_model=args.base_model, r=args.rank, alpha=2 * args.rank, seed=0)
        print(f"run {run.id} on {run.refresh()['base_model']}")
        acc = accuracy(run, heldout, args.max_tokens)
        rows.append({"round": 0, "heldout_accuracy": acc, "seconds": round(time.perf_counter() - started, 1)})
        print(f"round 0: held-out accuracy {acc:.3f}")
        for rnd in range(1, args.rounds + 1):
            answers = sample_all(run, train, args.samples, args.temperature, args.max_tokens, seed=1000 * rnd)
            examples, solved = [], 0
            for problem, texts in zip(train, answers, strict=True):
                correct = sorted({t.strip() for t in texts if is_correct(t, problem["answer"])})
                solved += bool(correct)
                for text in correct[:2]:  # at most two distinct correct answers per problem
                    messages = [*conversation(problem), {"role": "assistant", "content": text}]
                    examples.append({"messages": messages})
            losses = train_on(run, examples, args.lr, args.batch, args.epochs) if examples else []
            acc = accuracy(run, heldout, args.max_tokens)
            row = {
                "round": rnd,
                "train_solve_rate": solved / len(train),
                "examples": len(examples),
                "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None,
                "heldout_accuracy": acc,
                "seconds": round(time.perf_counter() - started, 1),
            }
            rows.append(row)
            print(
                f"round {rnd}: solved {solved}/{len(train)} train problems, trained on {len(examples)} answers "
                f"(loss {row['first_loss'] or 0:.3f} -> {row['last_loss'] or 0:.3f}), held-out accuracy {acc:.3f}"
            )
        saved = run.save_state("rejection-sampling-final", overwrite=True).result()
        run.delete()
    total = time.perf_counter() - started
    print(f"\n{'round':>5} {'train solved':>12} {'examples':>8} {'held-out acc':>12} {'time (s)':>9}")
    for row in rows:
        solve = f"{row['train_solve_rate']:.2f}" if "train_solve_rate" in row else "-"
        examples = row.get("examples", "-")
        print(f"{row['round']:>5} {solve:>12} {examples:>8} {row['heldout_accuracy']:>12.3f} {row['seconds']:>9}")
    print(f"wall time {total:.1f}s; final adapter saved at {saved['path']} (usable as a model for chat/eval/export)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "wall_seconds": total, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
