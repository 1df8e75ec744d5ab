"""GGUF export: f16 and q8_0 round trips on the tiny model (LoRA merged first), Modelfile, refusals."""

import json

import gguf
import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import wait_for
from service import models
from util.files import OUTPUT_MARKER


def _export(client, **body):
    return client.post("/api/export/gguf", json={"wait": True, **body})


def _succeeded(r) -> dict:
    assert r.status_code == 200, r.text
    task = r.json()["task"]
    assert task["status"] == "succeeded", task["error"]
    return task["metrics"]


def _logits(model, tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float().numpy()
    return out, enc["attention_mask"].numpy().astype(bool)


def test_f16_of_a_lora_adapter_round_trips_through_transformers(client, settings, adapter_dir):
    metrics = _succeeded(_export(client, model="outputs/lora-out", output_path="exports/tiny-f16", type="f16"))
    out = settings.model_dir / "exports" / "tiny-f16"
    assert metrics["merged_lora"] and metrics["tensor_types"] == {"F16": 15, "F32": 5}
    assert metrics["verification"]["passed"] and metrics["verification"]["tokenizer_matches"]
    # The output is marked as an export (the marker is what lets a later export with overwrite replace it).
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "Modelfile", "export_report.json", "model-f16.gguf"]
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-f16.gguf") and "<|im_start|>" in modelfile
    # Independently of the task's own check: the merged adapter and the file agree at a new batch.
    base = AutoModelForCausalLM.from_pretrained(settings.base_model_path(), dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f16.gguf", dtype=torch.float32).eval()
    tokenizer = models.load_tokenizer(settings.base_model_path())
    texts = ["a different prompt, longer than the others by far", "hi", "three rows"]
    ref, mask = _logits(reference, tokenizer, texts)
    got, _ = _logits(loaded, tokenizer, texts)
    scale = max(1.0, float(np.abs(ref[mask]).max()))
    assert float(np.abs(ref - got)[mask].max()) <= 2e-2 * scale
    assert (ref[mask].argmax(-1) == got[mask].argmax(-1)).mean() > 0.95


def test_q8_0_of_the_base_model_has_llama_cpp_layout(client, settings):
    metrics = _succeeded(_export(client, output_path="exports/tiny-q8", type="q8_0"))
    assert metrics["tensor_types"] == {"Q8_0": 15, "F32": 5} and not metrics["merged_lora"]
    verification = metrics["verification"]
    assert verification["passed"] and verification["max_abs_diff"] > 0  # quantised: close, not equal
    assert verification["max_abs_diff"] <= verification["allowed_abs_diff"]
    path = settings.model_dir / "exports" / "tiny-q8" / "model-q8_0.gguf"
    reader = gguf.GGUFReader(path)
    fields = {name: field for name, field in reader.fields.items()}

    def text(name: str) -> str:
        field = fields[name]
        return bytes(field.parts[field.data[0]]).decode()

    assert text("general.architecture") == "llama"
    assert text("tokenizer.ggml.model") == "gpt2"
    assert "<|im_start|>" in text("tokenizer.chat_template")
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    report = json.loads((settings.model_dir / "exports" / "tiny-q8" / "export_report.json").read_text())
    assert report["type"] == "q8_0"


def test_failed_verification_publishes_nothing(client, settings):
    r = client.post("/api/export/gguf", json={"output_path": "exports/strict", "type": "q8_0", "tolerance": 1e-7})
    assert r.status_code == 202, r.text
    task = wait_for(client, r.json()["task_id"], {"succeeded", "failed"})
    assert task["status"] == "failed" and "verification failed" in task["error"]
    exports = settings.model_dir / "exports"
    assert not (exports / "strict").exists() and not [p for p in exports.iterdir() if p.name.startswith(".")]


def test_gguf_bad_input(client, settings, tmp_path):
    assert _export(client, type="q4_0").status_code == 422
    assert _export(client, tolerance=0).status_code == 422
    assert _export(client, output_path="/etc/x").status_code == 403
    assert _export(client, model="no-such-model").status_code == 404
    qwen = settings.model_dir / "qwen-like"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    r = _export(client, model="qwen-like")
    assert r.status_code == 422 and "Llama-family" in r.json()["error"]["message"]
    (settings.model_dir / "exports").mkdir(exist_ok=True)
    (settings.model_dir / "exports" / "file").write_text("x")
    assert _export(client, output_path="exports/file", overwrite=True).status_code == 409
