"""The model card (README.md) of a train task's output: base model, strategy, data, hyperparameters, metrics."""

from pathlib import Path
from typing import Any

from entity.train import TrainRequest
from util.files import read_json


def base_model_name(model_path: Path) -> str:
    """The base model's name: the folder's name, or for an adapter given as the model, its own base's name."""
    config = model_path / "adapter_config.json"
    if config.is_file():
        try:
            base = read_json(config).get("base_model_name_or_path")
        except (OSError, ValueError):
            base = None
        if isinstance(base, str) and base:
            return Path(base).name
    return model_path.name


def _fmt(value: Any) -> str:
    """A metric for a table cell."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def model_card(
    req: TrainRequest,
    model_path: Path,
    is_adapter: bool,
    train_records: int,
    eval_records: int | None,
    metrics: dict[str, Any],
    task_id: str,
) -> str:
    """README.md text with Hugging Face card metadata; no hub links, since the base is a local folder."""
    base = base_model_name(model_path)
    cfg = req.config
    library = "peft" if is_adapter else "transformers"
    tags = ["win-train", "sft", "trl"] + (["lora"] if is_adapter else [])
    front = ["---", f"base_model: {base}", f"library_name: {library}", "tags:"]
    front += [f"- {t}" for t in tags]
    front += ["---", ""]
    kind = "a LoRA adapter" if is_adapter else "a fully fine-tuned model"
    lines = [
        f"# {req.output_dir or task_id}",
        "",
        f"This is {kind} trained from **{base}** by Win-Train task `{task_id}` with strategy `{req.strategy}` "
        "(TRL's SFTTrainer" + (" with a PEFT LoRA)." if is_adapter else ")."),
        "",
        "## Data",
        "",
        f"- training: `{req.dataset_path}` ({train_records} records)",
    ]
    if cfg.eval_dataset_path:
        lines.append(f"- evaluation: `{cfg.eval_dataset_path}` ({eval_records} records)")
    loss_on = "assistant tokens only" if cfg.assistant_only_loss else "every token"
    lines += [f"- loss on {loss_on}", "", "## Hyperparameters", "", "| setting | value |", "|---|---|"]
    length = {"max_steps": cfg.max_steps} if cfg.max_steps else {"num_train_epochs": cfg.num_train_epochs or 1}
    settings = {
        "learning_rate": cfg.learning_rate,
        **length,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "seed": cfg.seed,
    }
    budget = metrics.get("token_budget")
    if budget:  # how the step shape was chosen (service.train.budget)
        settings["tokens per device step"] = f"{budget['tokens_per_step']} ({budget['mode']}: {budget['reason']})"
        settings["gradient_checkpointing"] = budget["gradient_checkpointing"]
    if is_adapter and cfg.lora_config is not None:
        lora = cfg.lora_config
        settings |= {"lora r": lora.r, "lora_alpha": lora.lora_alpha, "target_modules": lora.target_modules}
    lines += [f"| {k} | {_fmt(v)} |" for k, v in settings.items()]
    shown = ("final_loss", "train_loss", "eval_loss", "global_step", "train_runtime", "num_input_tokens_seen")
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(metrics.get(k))} |" for k in shown if k in metrics]
    load = (
        "from peft import AutoPeftModelForCausalLM\n\nmodel = AutoPeftModelForCausalLM.from_pretrained(PATH)"
        if is_adapter
        else "from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained(PATH)"
    )
    lines += ["", "## Use", "", "```python", load, "```", ""]
    if is_adapter:
        lines += [f"PEFT looks for the base model at the path in `adapter_config.json`; Win-Train serves it by name "
                  f"(`{base}`) from its model store.", ""]  # fmt: skip
    return "\n".join(front + lines)
