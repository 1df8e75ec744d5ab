"""Export API: verified ONNX (full model and LoRA), merged weights, archives with download, bad input."""

import io
import json
import tarfile

import numpy as np
import onnxruntime as ort
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import add_task, wait_for
from entity.task import TaskStatus


def _export(client, kind: str, **body):
    return client.post(f"/api/export/{kind}", json={"wait": True, **body})


def _succeeded(r) -> dict:
    assert r.status_code == 200, r.text
    task = r.json()["task"]
    assert task["status"] == "succeeded", task["error"]
    return task["metrics"]


def _logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.float().numpy()


def _inputs(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    enc = tokenizer(texts, return_tensors="np", padding=True, padding_side="left")
    return enc["input_ids"].astype("int64"), enc["attention_mask"].astype("int64")


def _onnx_parity(out_dir, reference_model) -> float:
    """Run the exported folder on its own (tokenizer from the folder) at a new batch and length."""
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    ids, mask = _inputs(tokenizer, ["a completely different prompt, longer than before", "hi", "three rows now"])
    session = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    ref = _logits(reference_model, ids, mask)
    return float(np.abs(got - ref)[mask.astype(bool)].max())


def test_onnx_full_model_is_verified_and_self_contained(client, settings):
    r = _export(client, "onnx", output_path="exports/tiny-onnx", opset_version=18)
    metrics = _succeeded(r)
    out = settings.model_dir / "exports" / "tiny-onnx"
    assert r.json()["output_path"] == "exports/tiny-onnx"  # relative to its root, the model dir
    for name in ("model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json", "export_report.json"):
        assert (out / name).is_file(), name
    check = metrics["verification"]
    assert check["passed"] and check["greedy_next_tokens_match"]
    assert check["max_abs_diff"] <= 1e-4
    assert (metrics["opset_version"], metrics["exporter"], metrics["merged_lora"]) == (18, "dynamo", False)
    assert json.loads((out / "export_report.json").read_text())["verification"] == check
    base = AutoModelForCausalLM.from_pretrained(settings.base_model_path(), dtype=torch.float32).eval()
    assert _onnx_parity(out, base) <= 1e-4


def test_onnx_of_a_lora_task_merges_it_first(client, settings, adapter_dir):
    task_id = add_task(client, TaskStatus.succeeded, str(adapter_dir))
    metrics = _succeeded(_export(client, "onnx", model=task_id, output_path="exports/lora-onnx"))
    assert metrics["merged_lora"] is True
    assert metrics["verification"]["max_abs_diff"] <= 1e-4
    base = AutoModelForCausalLM.from_pretrained(settings.base_model_path(), dtype=torch.float32)
    adapter_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    assert _onnx_parity(settings.model_dir / "exports" / "lora-onnx", adapter_model) <= 1e-4


def test_onnx_legacy_opset_float16_and_overwrite(client, settings):
    metrics = _succeeded(_export(client, "onnx", output_path="exports/o14", opset_version=14))
    assert metrics["exporter"] == "legacy"
    import onnx

    model = onnx.load(str(settings.model_dir / "exports" / "o14" / "model.onnx"))
    assert {o.version for o in model.opset_import if o.domain == ""} == {14}
    # The same path again needs overwrite; with it, a float16 export replaces the folder.
    assert _export(client, "onnx", output_path="exports/o14").status_code == 409
    half = _succeeded(_export(client, "onnx", output_path="exports/o14", overwrite=True, dtype="float16"))
    assert half["dtype"] == "float16" and half["verification"]["passed"]


def test_failed_verification_fails_the_task_and_writes_nothing(client, settings):
    r = _export(client, "onnx", output_path="exports/strict", tolerance=1e-12)
    assert r.status_code == 200
    task = r.json()["task"]
    assert task["status"] == "failed"
    assert "verification failed" in task["error"]
    assert not (settings.model_dir / "exports" / "strict").exists()
    assert not [p for p in (settings.model_dir / "exports").iterdir() if p.name.startswith(".strict")]


def test_merged_equals_adapter_and_loads_plainly(client, settings, adapter_dir):
    metrics = _succeeded(_export(client, "merged", model="outputs/lora-out", output_path="exports/merged"))
    check = metrics["verification"]
    assert check["passed"] and check["max_abs_diff"] <= 1e-4 and check["saved_folder"]["differing"] == []
    out = settings.model_dir / "exports" / "merged"
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids, mask = _inputs(tokenizer, ["check the merge", "another prompt here"])
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(settings.base_model_path(), dtype=torch.float32)
    adapter_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    diff = np.abs(_logits(merged, ids, mask) - _logits(adapter_model, ids, mask))[mask.astype(bool)].max()
    assert diff <= 1e-4


def test_merging_a_full_model_is_409(client):
    r = _export(client, "merged")
    assert r.status_code == 409
    assert "not a LoRA adapter" in r.json()["error"]["message"]


def test_archive_downloads_extracts_and_loads_with_peft(client, settings, adapter_dir, tmp_path):
    (adapter_dir / "training_args.json").write_text(json.dumps({"strategy": "lora"}))
    (adapter_dir / "trainer_log.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    (adapter_dir / "checkpoint-1").mkdir()
    (adapter_dir / "checkpoint-1" / "optimizer.pt").write_bytes(b"x" * 100)
    task_id = add_task(client, TaskStatus.succeeded, str(adapter_dir))
    r = client.post("/api/export/archive", json={"model": task_id})
    assert r.status_code == 202
    export_id = r.json()["task_id"]
    final = wait_for(client, export_id, {"succeeded", "failed", "cancelled"})
    assert final["status"] == "succeeded", final["error"]
    assert client.get(f"/api/export/status/{export_id}").json()["status"] == "succeeded"
    assert final["metrics"]["verification"]["passed"]
    assert final["metrics"]["kind"] == "lora_adapter"
    assert final["output_dir"].endswith(f"{export_id}.tar.gz")

    download = client.get(f"/api/export/download/{export_id}")
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as tar:
        names = tar.getnames()
        tar.extractall(tmp_path, filter="data")
    root = tmp_path / adapter_dir.name
    assert not [n for n in names if "checkpoint-" in n]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"):
        assert (root / name).is_file(), name
    assert (root / "training_args.json").is_file() and (root / "trainer_log.jsonl").is_file()
    assert "PeftModel.from_pretrained" in (root / "README.md").read_text()

    ids, mask = _inputs(AutoTokenizer.from_pretrained(root), ["does the archive load?"])
    base = AutoModelForCausalLM.from_pretrained(settings.base_model_path(), dtype=torch.float32)
    extracted = PeftModel.from_pretrained(base, root).eval()
    base2 = AutoModelForCausalLM.from_pretrained(settings.base_model_path(), dtype=torch.float32)
    original = PeftModel.from_pretrained(base2, adapter_dir).eval()
    assert np.array_equal(_logits(extracted, ids, mask), _logits(original, ids, mask))

    (settings.model_dir / final["output_dir"]).unlink()  # deleted on the server: a 404 naming the file, not the folder
    gone = client.get(f"/api/export/download/{export_id}")
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found"
    assert f"{export_id}.tar.gz" in gone.text and str(settings.model_dir) not in gone.text
    assert str(settings.data_dir) not in gone.text


def test_archive_of_a_full_model(client):
    metrics = _succeeded(_export(client, "archive", output_path="exports/base.tar.gz"))
    assert metrics["kind"] == "full_model"
    assert any(f.endswith("/model.safetensors") for f in metrics["files"])


def test_export_bad_input(client, settings, adapter_dir):
    assert _export(client, "onnx", opset_version=13).status_code == 422
    assert _export(client, "onnx", opset_version=24).status_code == 422
    assert _export(client, "onnx", dtype="int8").status_code == 422
    assert _export(client, "onnx", output_path="/etc/exported").status_code == 403
    assert _export(client, "onnx", output_path="../../outside").status_code == 403
    assert _export(client, "archive", output_path="exports/x.zip").status_code == 422
    assert _export(client, "onnx", model="no-such-model").status_code == 404
    assert _export(client, "onnx", model="a", model_path="b").status_code == 422
    failed = add_task(client, TaskStatus.failed, None)
    assert _export(client, "onnx", model=failed).status_code == 409
    (settings.model_dir / "exports").mkdir(exist_ok=True)
    (settings.model_dir / "exports" / "taken.tar.gz").write_bytes(b"data")
    assert _export(client, "archive", output_path="exports/taken.tar.gz").status_code == 409
    assert client.get("/api/export/download/" + "0" * 32).status_code == 404
    assert client.get(f"/api/export/download/{failed}").status_code == 422
    failed_archive = add_task(client, TaskStatus.failed, "x.tar.gz", kind="export", request={"format": "archive"})
    r = client.get(f"/api/export/download/{failed_archive}")
    assert r.status_code == 409 and "failed" in r.json()["error"]["message"]
