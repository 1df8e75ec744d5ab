r"""RL with a numeric verifier through tinker-cookbook's own RL loop, against this server via the Tinker SDK.

Arithmetic word problems are generated locally (as examples/rejection_sampling_sft.py makes them); the cookbook's
ProblemEnv rewards a correct final number, its rl.train loop samples groups, computes advantages and trains with
`importance_sampling` or `ppo`. Held-out accuracy is the test set's `test/env/all/correct` in metrics.jsonl:

    python examples/tinker_rl.py --base-url http://127.0.0.1:8000 --api-key tml-<key> \
        --model SmolLM2-135M-Instruct --tokenizer model/base/SmolLM2-135M-Instruct --loss ppo --steps 3
"""

import argparse
import asyncio
import json
import os
import random
import re
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import chz
from tinker_cookbook import renderers
from tinker_cookbook.rl import train
from tinker_cookbook.rl.problem_env import ProblemEnv, ProblemGroupBuilder
from tinker_cookbook.rl.types import EnvGroupBuilder, RLDataset, RLDatasetBuilder
from tinker_cookbook.tokenizer_utils import get_tokenizer, register_tokenizer
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from examples.rejection_sampling_sft import make_problems  # noqa: E402 - the same generated problems

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class ArithmeticEnv(ProblemEnv):
    """One word problem; the answer is right when the response's last number equals it."""

    def __init__(self, renderer: renderers.Renderer, question: str, answer: int) -> None:
        """Keep the question and its integer answer."""
        super().__init__(renderer, format_coef=0.0)
        self.question, self.answer = question, answer

    def get_question(self) -> str:
        """The prompt the policy sees."""
        return f"{self.question} Answer with the number only."

    def check_answer(self, sample_str: str) -> bool:
        """The numeric verifier: the last number in the response equals the answer."""
        numbers = NUMBER.findall(sample_str.replace(",", ""))
        return bool(numbers) and float(numbers[-1]) == float(self.answer)

    def check_format(self, sample_str: str) -> bool:
        """Any response with a number is well formed."""
        return bool(NUMBER.search(sample_str))

    def get_reference_answer(self) -> str:
        """The expected answer, for logs."""
        return str(self.answer)


class ProblemDataset(RLDataset):
    """Batches of problem groups (group_size rollouts of the same problem each)."""

    def __init__(self, builders: list[EnvGroupBuilder], batch_size: int) -> None:
        """Keep the groups."""
        self.builders, self.batch_size = builders, batch_size

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        """The index-th batch of groups."""
        return self.builders[index * self.batch_size : (index + 1) * self.batch_size]

    def __len__(self) -> int:
        """Number of batches."""
        return len(self.builders) // self.batch_size


@chz.chz
class ArithmeticDatasetBuilder(RLDatasetBuilder):
    """Generated arithmetic problems: a training stream and a held-out test set."""

    model_name: str
    renderer_name: str
    batch_size: int = 4
    group_size: int = 4
    n_train: int = 256
    n_test: int = 16
    seed: int = 0

    async def __call__(self) -> tuple[RLDataset, RLDataset | None]:
        """Build the train and test datasets."""
        renderer = renderers.get_renderer(self.renderer_name, get_tokenizer(self.model_name))
        problems = make_problems(self.n_train + self.n_test, self.seed)
        random.Random(self.seed).shuffle(problems)

        def groups(items: list[dict], size: int) -> list[EnvGroupBuilder]:
            return [
                ProblemGroupBuilder(
                    env_thunk=partial(ArithmeticEnv, renderer, p["question"], int(p["answer"])),
                    num_envs=size,
                    dataset_name="arithmetic",
                )
                for p in items
            ]

        train_set = ProblemDataset(groups(problems[: self.n_train], self.group_size), self.batch_size)
        test_set = ProblemDataset(groups(problems[self.n_train :], 1), self.n_test)
        return train_set, test_set


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default=os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:8000"))
    p.add_argument("--api-key", default=os.environ.get("TINKER_API_KEY", "tml-local"), help="tml-<one of our keys>")
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="a base model the server lists")
    p.add_argument("--tokenizer", default=str(ROOT / "model" / "base" / "SmolLM2-135M-Instruct"), help="its tokenizer")
    p.add_argument("--renderer", default="qwen3_instruct", help="a cookbook renderer (ChatML fits SmolLM2)")
    p.add_argument("--loss", default="importance_sampling", choices=["importance_sampling", "ppo"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4, help="problems per step")
    p.add_argument("--group-size", type=int, default=4, help="samples per problem")
    p.add_argument("--n-test", type=int, default=16, help="held-out problems")
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--log-path", default="/tmp/tinker_rl")
    return p.parse_args(argv)


def held_out_accuracy(log_path: Path) -> list[tuple[int, float]]:
    """(step, held-out accuracy) from the cookbook's metrics.jsonl."""
    rows = []
    for line in (log_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        acc = next((v for k, v in record.items() if k.startswith("test/") and k.endswith("/correct")), None)
        if acc is not None:
            rows.append((int(record["step"]), float(acc)))
    return rows


def main(argv: list[str] | None = None) -> list[tuple[int, float]]:
    """Run the cookbook's RL loop; print and return held-out accuracy per evaluation."""
    args = parse_args(argv)
    os.environ["TINKER_API_KEY"] = args.api_key
    register_tokenizer(args.model, lambda: AutoTokenizer.from_pretrained(args.tokenizer))
    log_path = Path(args.log_path)
    builder = ArithmeticDatasetBuilder(
        model_name=args.model,
        renderer_name=args.renderer,
        batch_size=args.batch_size,
        group_size=args.group_size,
        n_train=args.batch_size * args.steps,
        n_test=args.n_test,
    )
    config = train.Config(
        learning_rate=args.lr,
        dataset_builder=builder,
        model_name=args.model,
        recipe_name="tinker_rl",
        renderer_name=args.renderer,
        max_tokens=args.max_tokens,
        log_path=str(log_path),
        eval_every=args.eval_every,
        save_every=0,
        loss_fn=args.loss,
        lora_rank=args.rank,
        base_url=args.base_url,
        ttl_seconds=None,
        max_steps=args.steps,
        rollout_json_export=False,
        num_groups_to_log=0,
    )
    asyncio.run(train.main(config))
    curve = held_out_accuracy(log_path)
    print(f"\n{'step':>5} {'held-out accuracy':>18}")
    for step, acc in curve:
        print(f"{step:>5} {acc:>18.3f}")
    return curve


if __name__ == "__main__":
    main()
