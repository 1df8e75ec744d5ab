"""GGUF export for llama.cpp and Ollama: Llama-family weights in f16, bf16 or q8_0, tokenizer and chat template inside.

The file is written with the `gguf` package's writer under llama.cpp's tensor names (q/k rows permuted the way
llama.cpp's converter does), then loaded back with transformers (`gguf_file=`) and its logits compared with the
source model's before anything is published.
"""

import shutil
import time
from pathlib import Path
from typing import Any

from entity.task import TaskKind
from service import models
from util.files import fresh_dir, publish, read_json

# Relative to the logit scale (the largest |reference logit| on real tokens, at least 1). f16 keeps 11 significant
# bits per weight and bf16 8; q8_0 stores 8-bit integers per block of 32 with an f16 scale (~0.4% of the block's
# largest weight), and those errors add up over every layer.
GGUF_TOLERANCE = {"f16": 2e-2, "bf16": 5e-2, "q8_0": 1e-1}
SUPPORTED_MODEL_TYPES = ("llama",)


def file_type(kind: str) -> tuple[Any, Any]:
    """(tensor type of the large matrices, llama.cpp file type) for an export type."""
    import gguf

    q = gguf.GGMLQuantizationType
    return {
        "f16": (q.F16, gguf.LlamaFileType.MOSTLY_F16),
        "bf16": (q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
        "q8_0": (q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    }[kind]


def model_type(path: Path) -> str:
    """The model_type of a model folder (an adapter's base for an adapter)."""
    folder = Path(models.adapter_base(path)) if models.is_adapter_dir(path) else path
    try:
        return read_json(folder / "config.json").get("model_type", "")
    except (OSError, ValueError):
        return ""


def permute(weights: Any, n_head: int, n_head_kv: int) -> Any:
    """Reorder q/k rows from Hugging Face's rotary layout to llama.cpp's (its converter's `permute`)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def vocab(tokenizer: Any, size: int) -> tuple[list[str], list[int]]:
    """Tokens by id (padded to the model's vocab size) and their llama.cpp token types."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    special = set(tokenizer.all_special_tokens)
    tokens, types = [], []
    for i in range(size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if token in special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_gguf(model: Any, tokenizer: Any, tokenizer_dir: Path, path: Path, kind: str, name: str) -> dict[str, Any]:
    """Write a Llama-family model as GGUF; the tensor types written, counted."""
    import gguf
    import numpy as np

    cfg = model.config
    qtype, ftype = file_type(kind)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(ftype)

    tokens, types = vocab(tokenizer, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens))
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    written: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads a missing output.weight as tied to the token embedding
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no llama.cpp tensor name for {hf_name}")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        # As llama.cpp's converter does: vectors (norms) stay f32, and q8_0 needs rows in whole blocks of 32.
        wanted = qtype if data.ndim >= 2 else gguf.GGMLQuantizationType.F32
        if wanted == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            wanted = gguf.GGMLQuantizationType.F16
        packed = gguf.quants.quantize(np.ascontiguousarray(data), wanted)
        raw = {} if wanted in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else {"raw_dtype": wanted}
        writer.add_tensor(gguf_name, packed, **raw)
        written[wanted.name] = written.get(wanted.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def modelfile(gguf_name: str, tokenizer: Any) -> str:
    """An Ollama Modelfile for the written file (a ChatML TEMPLATE when the model's chat template is ChatML)."""
    lines = [f"FROM ./{gguf_name}", ""]
    template = getattr(tokenizer, "chat_template", "") or ""
    if "<|im_start|>" in template:
        system = (
            "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
            "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
            "<|im_start|>assistant\n"
        )
        lines += [f'TEMPLATE """{system}"""', 'PARAMETER stop "<|im_start|>"', 'PARAMETER stop "<|im_end|>"']
    elif tokenizer.eos_token:  # Ollama reads the chat template embedded in the GGUF file
        lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    return "\n".join(lines) + "\n"


def export_gguf(model_path: Path, output: Path, req: dict[str, Any], store: Any, task_id: str) -> dict[str, Any]:
    """Write model-<type>.gguf and a Modelfile, then load the file back with transformers and compare logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from entity.export import GgufExportRequest
    from service.export import (
        VERIFY_PROMPTS,
        compare_logits,
        load_fp32,
        require,
        torch_logits,
        verify_batch,
    )

    opts = GgufExportRequest.model_validate(req)
    tok_dir = models.tokenizer_dir(model_path)
    tokenizer = models.load_tokenizer(tok_dir)
    model = load_fp32(model_path)  # a LoRA adapter is merged into its base here
    batch = verify_batch(tokenizer)
    name = f"model-{opts.type}.gguf"
    staging = fresh_dir(output)
    try:
        started = time.perf_counter()
        written = write_gguf(model, tokenizer, tok_dir, staging / name, opts.type, model_path.name)
        write_seconds = time.perf_counter() - started
        (staging / "Modelfile").write_text(modelfile(name, tokenizer), encoding="utf-8")
        store.add_event(task_id, "log", f"wrote {name} in {write_seconds:.1f}s ({written}); verifying")
        loaded = AutoModelForCausalLM.from_pretrained(str(staging), gguf_file=name, dtype="float32").eval()
        got = torch_logits(loaded, batch)
        ref = torch_logits(model, batch)
        tolerance = opts.tolerance or GGUF_TOLERANCE[opts.type]
        verification = compare_logits(ref, got, batch["attention_mask"], tolerance)
        require(verification)  # before the (slow) tokenizer check: wrong weights need no more evidence
        # The tokenizer inside the file must tokenise the verification prompts like the source tokenizer.
        back = AutoTokenizer.from_pretrained(str(staging), gguf_file=name)
        texts = [models.render_chat(tokenizer, [{"role": "user", "content": p}], True) for p in VERIFY_PROMPTS]
        same_ids = all(
            back(t, add_special_tokens=False)["input_ids"] == tokenizer(t, add_special_tokens=False)["input_ids"]
            for t in texts
        )
        verification["tokenizer_matches"] = same_ids
        verification["chat_template_embedded"] = bool(getattr(back, "chat_template", None))
        verification["passed"] = verification["passed"] and same_ids
        require(verification)
        publish(staging, output, TaskKind.export, task_id, format="gguf")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "format": "gguf",
        "type": opts.type,
        "source": str(model_path),
        "merged_lora": models.is_adapter_dir(model_path),
        "output_path": str(output),
        "gguf_file": str(output / name),
        "gguf_bytes": (output / name).stat().st_size,
        "tensor_types": written,
        "files": sorted(p.name for p in output.iterdir()),
        "ollama": f"cd {output} && ollama create {model_path.name.lower()} -f Modelfile",
        "verification": verification,
    }
