"""Request-body examples for the OpenAPI document, in pipeline order, all working on a fresh default install.

They follow the README's sample: upload test/data/train_sample.json, validate it, split it into data/sample/,
train a LoRA into model/outputs/sample-lora, then chat with, evaluate and export that output. Every example that
writes passes `overwrite`, so "Try it out" can be pressed twice. test/test_openapi.py posts each one.
"""

from typing import Any

SAMPLE_UPLOAD = "uploads/train_sample.json"
SAMPLE_LORA = "outputs/sample-lora"
BASE_MODEL = "SmolLM2-135M-Instruct"

Examples = dict[str, dict[str, Any]]


def _one(summary: str, value: dict[str, Any], description: str | None = None) -> dict[str, Any]:
    """One entry of `openapi_examples`."""
    entry: dict[str, Any] = {"summary": summary, "value": value}
    if description:
        entry["description"] = description
    return entry


VALIDATE: Examples = {
    "sample": _one(
        "The uploaded sample",
        {"file_path": SAMPLE_UPLOAD, "max_length": 512},
        "Upload test/data/train_sample.json first (POST /api/data/upload).",
    )
}

PROCESS: Examples = {
    "sample": _one(
        "Split the sample 80/10/10 into data/sample/",
        {
            "input_file": SAMPLE_UPLOAD,
            "output_dir": "sample",
            "split_config": {"train_ratio": 0.8, "val_ratio": 0.1, "test_ratio": 0.1, "shuffle": True, "seed": 42},
            "overwrite": True,
        },
    )
}

TRAIN: Examples = {
    "lora": _one(
        "A short LoRA run on the split sample",
        {
            "strategy": "lora",
            "dataset_path": "sample/train.jsonl",
            "output_dir": SAMPLE_LORA,
            "overwrite": True,
            "config": {
                "per_device_train_batch_size": 2,
                "learning_rate": 2e-4,
                "max_steps": 10,
                "save_steps": 10,
                "eval_dataset_path": "sample/val.jsonl",
                "lora_config": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.0},
            },
        },
        "Needs the split from POST /api/data/process. Writes model/outputs/sample-lora.",
    ),
    "full": _one(
        "A short full fine-tune (trl)",
        {
            "strategy": "trl",
            "dataset_path": "sample/train.jsonl",
            "output_dir": "outputs/sample-sft",
            "overwrite": True,
            "config": {"per_device_train_batch_size": 2, "learning_rate": 1e-5, "max_steps": 4, "save_steps": 4},
        },
    ),
}

_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

CHAT: Examples = {
    "base": _one("The base model, greedy", {"messages": _QUESTION, "max_tokens": 64, "temperature": 0}),
    "trained": _one(
        "The LoRA trained by the train example",
        {"model": SAMPLE_LORA, "messages": _QUESTION, "max_tokens": 64, "temperature": 0},
    ),
}

BATCH: Examples = {
    "two": _one(
        "Two questions in one batched generate() call",
        {
            "requests": [
                {"messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0, "max_tokens": 16},
                {"messages": [{"role": "user", "content": "Name a fruit."}], "temperature": 0, "max_tokens": 16},
            ]
        },
    )
}

OPENAI_CHAT: Examples = {
    "plain": _one("One completion", {"model": BASE_MODEL, "messages": _QUESTION, "max_tokens": 32}),
    "stream": _one(
        "Streamed, with usage",
        {
            "model": BASE_MODEL,
            "messages": _QUESTION,
            "max_tokens": 32,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ),
}

EVAL: Examples = {
    "compare": _one(
        "The trained LoRA against its base on the held-back split",
        {
            "model": SAMPLE_LORA,
            "compare_with": BASE_MODEL,
            "dataset_path": "sample/test.jsonl",
            "metrics": ["loss", "perplexity", "accuracy"],
            "accuracy_mode": "contains",
            "generation": {"max_tokens": 32, "temperature": 0},
        },
        "Answers 202 at once; poll GET /api/eval/status/{task_id}.",
    )
}

EXPORT_ONNX: Examples = {
    "lora": _one(
        "The trained LoRA, merged, as ONNX",
        {"model": SAMPLE_LORA, "output_path": "exports/sample-onnx", "overwrite": True, "wait": True},
    )
}

EXPORT_MERGED: Examples = {
    "lora": _one(
        "The trained LoRA merged into its base",
        {"model": SAMPLE_LORA, "output_path": "exports/sample-merged", "overwrite": True, "wait": True},
    )
}

EXPORT_ARCHIVE: Examples = {
    "lora": _one(
        "The trained LoRA as a tar.gz",
        {"model": SAMPLE_LORA, "output_path": "exports/sample-lora.tar.gz", "overwrite": True, "wait": True},
    )
}

EXPORT_GGUF: Examples = {
    "q8_0": _one(
        "The trained LoRA merged and written as a q8_0 GGUF with an Ollama Modelfile",
        {"model": SAMPLE_LORA, "output_path": "exports/sample-gguf", "type": "q8_0", "overwrite": True, "wait": True},
    )
}

FINE_TUNING_JOB: Examples = {
    "supervised": _one(
        "One epoch of LoRA on an uploaded file",
        {
            "model": "SmolLM2-135M-Instruct",
            "training_file": "file-0123456789abcdef0123456789abcdef",
            "suffix": "demo",
            "hyperparameters": {"n_epochs": 1, "batch_size": 8},
        },
        "Upload the file first with POST /v1/files and put its id here.",
    )
}

CREATE_RUN: Examples = {"lora": _one("A fresh rank-16 LoRA on the base model", {"lora": {"r": 16, "alpha": 32}})}

FORWARD_BACKWARD: Examples = {
    "chat": _one(
        "A chat example (assistant tokens weighted) and a token example",
        {
            "examples": [
                {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
                {"input_ids": [1, 2, 3], "target_ids": [2, 3, 4], "weights": [0, 1, 1]},
            ]
        },
    )
}

OPTIM_STEP: Examples = {"adamw": _one("AdamW at 1e-4", {"learning_rate": 1e-4})}

SAMPLE: Examples = {
    "chat": _one(
        "Two samples of one conversation",
        {"messages": [[{"role": "user", "content": "2+3?"}]], "num_samples": 2, "max_tokens": 16, "temperature": 0.8},
    )
}

SAVE_STATE: Examples = {"step": _one("Save as runs/<run_id>/step-1", {"name": "step-1"})}

LOAD_STATE: Examples = {
    "trained": _one(
        "Load the LoRA trained by the train example (rank 16, no optimizer state)",
        {"path": SAMPLE_LORA, "with_optimizer": False},
        "A state saved by save_state is at runs/<run_id>/<name> and also has its optimizer state.",
    )
}
