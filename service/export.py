"""Export: verified ONNX, merged LoRA weights and portable archives, each run as a task.

The service half (ExportService) checks a request and queues it; the worker half (run_export) runs in the
task's child process, writes the output, verifies it, and fails the task when the verification fails.
"""

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

from entity.export import ArchiveExportRequest, ExportBase, GgufExportRequest, MergedExportRequest, OnnxExportRequest
from entity.task import TaskKind, TaskRow, TaskStatus
from service import models
from service.jobs import JobRunner
from service.tasks import TaskStore
from util.errors import ConflictError, InvalidInputError, NotFoundError
from util.files import (
    OUTPUT_MARKER,
    check_replaceable,
    default_file_mode,
    fresh_dir,
    open_stored,
    publish,
    read_json,
    write_json,
)
from util.paths import resolve_output
from util.settings import Settings

log = logging.getLogger(__name__)

VERIFY_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about gradient descent.",
    "List three uses of a paperclip, then explain which is the most creative and why.",
]
# Relative to the logit scale (the largest |reference logit| on real tokens, at least 1).
DEFAULT_TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
MERGE_TOLERANCE = 1e-4
DYNAMO_MIN_OPSET = 18
LEGACY_MAX_OPSET = 20
ARCHIVE_SKIP = ("checkpoint-", "runs", "__pycache__", OUTPUT_MARKER)


class VerificationError(RuntimeError):
    """The written export does not reproduce the source model."""


# -- service half: request checks and queueing ----------------------------------------------------------


class ExportService:
    """Checks export requests against the sandbox and the store, and submits them to the runner."""

    def __init__(self, settings: Settings, runner: JobRunner) -> None:
        """Bind to settings and the job runner."""
        self.settings = settings
        self.runner = runner

    def _output(self, raw: str | None, default: str, overwrite: bool) -> Path:
        """Resolve an output path (relative to the model dir); only an earlier export is replaced, with overwrite."""
        name = raw or default
        path = resolve_output(name, self.settings.model_dir, self.settings)
        busy = self.runner.store.active_with_output(str(path))
        if busy:
            raise ConflictError(f"Task {busy[0].id} is already writing to '{name}'.", details={"output_path": name})
        if check_replaceable(path, TaskKind.export, name) and not overwrite:
            raise ConflictError(
                f"output_path '{name}' already exists; choose another or pass \"overwrite\": true.",
                details={"output_path": name},
            )
        return path

    def _submit(self, fmt: str, req: ExportBase, model: Path, output: Path, task_id: str, **extra: Any) -> TaskRow:
        """Queue the export task with its resolved paths."""
        request = {
            "format": fmt,
            "export": req.model_dump(),
            "resolved": {"model_path": str(model), "output_path": str(output), **extra},
        }
        return self.runner.submit(TaskKind.export, request, str(output), task_id)

    def onnx(self, req: OnnxExportRequest) -> TaskRow:
        """Queue an ONNX export (a LoRA output is merged into its base first)."""
        model = models.resolve_model_ref(req.model_ref, self.settings, self.runner.store)
        task_id = self.runner.store.new_id()
        output = self._output(req.output_path, f"exports/{task_id}-onnx", req.overwrite)
        if output.is_file():
            raise ConflictError(f"output_path '{output}' is a file; ONNX exports write a folder.")
        return self._submit("onnx", req, model, output, task_id)

    def merged(self, req: MergedExportRequest) -> TaskRow:
        """Queue merging a LoRA adapter into its base (409 for a model that is not a LoRA adapter)."""
        model = models.resolve_model_ref(req.model_ref, self.settings, self.runner.store)
        if not models.is_adapter_dir(model):
            raise ConflictError(
                f"'{req.model_ref or self.settings.models.base_model}' is a full model, not a LoRA adapter: "
                "there is nothing to merge. Export it with /api/export/onnx or /api/export/archive instead.",
                details={"model": req.model_ref},
            )
        models.tokenizer_dir(model)  # 404 now if the adapter's base model is gone
        task_id = self.runner.store.new_id()
        output = self._output(req.output_path, f"exports/{task_id}-merged", req.overwrite)
        if output.is_file():
            raise ConflictError(f"output_path '{output}' is a file; a merged model is a folder.")
        return self._submit("merged", req, model, output, task_id)

    def archive(self, req: ArchiveExportRequest) -> TaskRow:
        """Queue writing a tar.gz of the model or adapter, tokenizer, training args and log."""
        model = models.resolve_model_ref(req.model_ref, self.settings, self.runner.store)
        task_id = self.runner.store.new_id()
        output = self._output(req.output_path, f"exports/{task_id}.tar.gz", req.overwrite)
        if not output.name.endswith(".tar.gz"):
            raise InvalidInputError(
                f"output_path '{req.output_path}' must end with .tar.gz.", details={"output_path": req.output_path}
            )
        if output.is_dir():
            raise ConflictError(f"output_path '{output}' is a folder; an archive is a file.")
        return self._submit("archive", req, model, output, task_id)

    def gguf(self, req: GgufExportRequest) -> TaskRow:
        """Queue a GGUF export of a Llama-family model (a LoRA output is merged into its base first)."""
        from service.export_gguf import SUPPORTED_MODEL_TYPES, model_type

        model = models.resolve_model_ref(req.model_ref, self.settings, self.runner.store)
        models.tokenizer_dir(model)  # 404 now if an adapter's base model is gone
        kind = model_type(model)
        if kind not in SUPPORTED_MODEL_TYPES:
            raise InvalidInputError(
                f"GGUF export supports Llama-family models ({', '.join(SUPPORTED_MODEL_TYPES)}); this one is "
                f"'{kind or 'unknown'}'.",
                details={"model": req.model_ref, "model_type": kind},
            )
        task_id = self.runner.store.new_id()
        output = self._output(req.output_path, f"exports/{task_id}-gguf", req.overwrite)
        if output.is_file():
            raise ConflictError(f"output_path '{output}' is a file; a GGUF export writes a folder.")
        return self._submit("gguf", req, model, output, task_id)

    def open_download(self, task_id: str) -> tuple[BinaryIO, str]:
        """The archive of a succeeded archive export, opened for download (never through a link), and its name."""
        path = self.download_path(task_id)
        archive = f"The archive of task '{task_id}' ({path.name})"  # the file name only, no server folder
        return open_stored(path, self.settings.roots, archive), path.name

    def download_path(self, task_id: str) -> Path:
        """The archive of a succeeded archive export, for download."""
        task = self.runner.store.get(task_id)
        if task.kind != TaskKind.export or task.request.get("format") != "archive":
            raise InvalidInputError(f"Task '{task_id}' is not an archive export; only archives can be downloaded.")
        if task.status != TaskStatus.succeeded:
            raise ConflictError(
                f"Archive export '{task_id}' is {task.status}; it can be downloaded once it has succeeded.",
                details={"status": task.status},
            )
        path = Path(task.output_dir or "")
        if not path.is_file():
            # the file name only: the server's own folders stay in the server
            raise NotFoundError(f"The archive of task '{task_id}' ({path.name}) is gone.", details={"task_id": task_id})
        return path


# -- worker half: writing and verifying -------------------------------------------------------------------


def run_export(settings: Settings, store: TaskStore, task_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """Run one export task and return its verified report."""
    from service.export_gguf import export_gguf

    handlers = {"onnx": export_onnx, "merged": export_merged, "archive": export_archive, "gguf": export_gguf}
    fmt = request["format"]
    resolved = request["resolved"]
    model_path, output = Path(resolved["model_path"]), Path(resolved["output_path"])
    models.check_model_sources(model_path, settings)  # again here: the adapter's files may have changed since
    store.add_event(task_id, "log", f"exporting {model_path.name} as {fmt} to {output}")
    started = time.perf_counter()
    report = handlers[fmt](model_path, output, request["export"], store, task_id)
    report["export_seconds"] = round(time.perf_counter() - started, 2)
    if fmt != "archive":
        write_json(output / "export_report.json", report)
    return report


def require(verification: dict[str, Any]) -> None:
    """Refuse to publish an export whose verification failed; the task fails with the figures."""
    if not verification["passed"]:
        raise VerificationError(f"verification failed, nothing was written: {json.dumps(verification)}")


def load_fp32(path: Path) -> Any:
    """The model as a plain fp32 CPU module; a LoRA output is merged into its base."""
    return models.load_for_inference(path, "float32", "cpu")


def verify_batch(tokenizer: Any) -> dict[str, Any]:
    """Chat-rendered verification prompts of different lengths, left-padded into one batch (numpy)."""
    texts = [
        models.render_chat(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True)
        for p in VERIFY_PROMPTS
    ]
    enc = tokenizer(texts, return_tensors="np", padding=True, padding_side="left", add_special_tokens=False)
    return {"input_ids": enc["input_ids"].astype("int64"), "attention_mask": enc["attention_mask"].astype("int64")}


def torch_logits(model: Any, batch: dict[str, Any]) -> Any:
    """Logits of the batch through PyTorch, as a float32 numpy array."""
    import torch

    with torch.inference_mode():
        out = model(
            input_ids=torch.from_numpy(batch["input_ids"]),
            attention_mask=torch.from_numpy(batch["attention_mask"]),
            use_cache=False,
        ).logits
    return out.float().numpy()


def compare_logits(ref: Any, got: Any, mask: Any, tolerance: float) -> dict[str, Any]:
    """Max |difference| on real tokens against tolerance x logit scale, and greedy next-token agreement."""
    import numpy as np

    real = mask.astype(bool)
    diff = float(np.abs(ref - got)[real].max())
    scale = max(1.0, float(np.abs(ref[real]).max()))
    allowed = tolerance * scale
    ref_last, got_last = ref[:, -1, :], got[:, -1, :]  # left padding: the last position is real in every row
    ref_next, got_next = ref_last.argmax(-1), got_last.argmax(-1)
    top2 = np.sort(ref_last, axis=-1)[:, -2:]
    # A different argmax is only acceptable when the reference's top two are closer than the allowed difference.
    unexplained = [int(i) for i in np.nonzero(ref_next != got_next)[0] if top2[i, 1] - top2[i, 0] > allowed]
    agreement = float((ref[real].argmax(-1) == got[real].argmax(-1)).mean())
    return {
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "logit_scale": scale,
        "allowed_abs_diff": allowed,
        "greedy_next_tokens_match": bool((ref_next == got_next).all()),
        "next_tokens_reference": ref_next.tolist(),
        "next_tokens_export": got_next.tolist(),
        "top1_agreement_all_positions": round(agreement, 6),
        "prompts": len(VERIFY_PROMPTS),
        "real_tokens": int(real.sum()),
        "passed": bool(diff <= allowed and not unexplained),
    }


def onnx_write(model: Any, path: Path, opset: int, example: dict[str, Any]) -> str:
    """Export with the dynamo exporter (opset >= 18) or the legacy one (older opsets, or dynamo failed); which ran."""
    import onnx
    import torch

    class LogitsOnly(torch.nn.Module):
        """(input_ids, attention_mask) -> logits, without a KV cache."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    wrapper = LogitsOnly(model).eval()
    args = (torch.from_numpy(example["input_ids"]), torch.from_numpy(example["attention_mask"]))
    names = {"input_names": ["input_ids", "attention_mask"], "output_names": ["logits"]}
    # Above ~2 GB a protobuf cannot hold the weights: they go to a side file next to model.onnx.
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8 * 2**30
    # The dynamo exporter writes opset 18 and above natively; converting its graph down to older opsets
    # failed on every Llama-family model tried, so older opsets go straight to the legacy exporter.
    if opset >= DYNAMO_MIN_OPSET:
        try:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
            shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
            torch.onnx.export(
                wrapper, args, str(path), dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                external_data=external, **names,
            )  # fmt: skip
            written = {o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain == ""}
            if written == {opset}:
                return "dynamo"
            log.info("dynamo exporter wrote opset %s instead of %s; using the legacy exporter", written, opset)
        except Exception as exc:  # noqa: BLE001 - any dynamo failure falls back to the legacy exporter
            log.info("dynamo export failed (%s: %s); using the legacy exporter", type(exc).__name__, exc)
        if opset > LEGACY_MAX_OPSET:
            raise RuntimeError(f"The dynamo exporter could not write opset {opset}, and the legacy one stops at 20.")
    for leftover in path.parent.glob(path.name + "*"):
        leftover.unlink()
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    axes["logits"] = {0: "batch", 1: "sequence"}
    torch.onnx.export(wrapper, args, str(path), dynamo=False, dynamic_axes=axes, opset_version=opset, **names)
    return "legacy"


def export_onnx(model_path: Path, output: Path, req: dict[str, Any], store: TaskStore, task_id: str) -> dict[str, Any]:
    """Write model.onnx with tokenizer and config beside it, then check it against PyTorch in onnxruntime."""
    import onnxruntime as ort
    import torch

    opts = OnnxExportRequest.model_validate(req)
    tokenizer = models.load_tokenizer(models.tokenizer_dir(model_path))
    model = load_fp32(model_path)
    if opts.dtype == "float16":
        model = model.to(torch.float16)
    batch = verify_batch(tokenizer)
    staging = fresh_dir(output)
    try:
        started = time.perf_counter()
        exporter = onnx_write(model, staging / "model.onnx", opts.opset_version, batch)
        export_seconds = time.perf_counter() - started
        model.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        store.add_event(task_id, "log", f"exported with the {exporter} exporter in {export_seconds:.1f}s; verifying")
        session = ort.InferenceSession(str(staging / "model.onnx"), providers=["CPUExecutionProvider"])
        started = time.perf_counter()
        got = session.run(["logits"], batch)[0].astype("float32")
        ort_ms = (time.perf_counter() - started) * 1000
        ref = torch_logits(model, batch)
        tolerance = opts.tolerance or DEFAULT_TOLERANCE[opts.dtype]
        verification = compare_logits(ref, got, batch["attention_mask"], tolerance)
        verification["onnxruntime_ms"] = round(ort_ms, 1)
        require(verification)
        publish(staging, output, TaskKind.export, task_id, format="onnx")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = sorted(p.name for p in output.iterdir() if p.name != OUTPUT_MARKER)
    return {
        "format": "onnx",
        "source": str(model_path),
        "merged_lora": models.is_adapter_dir(model_path),
        "output_path": str(output),
        "exporter": exporter,
        "opset_version": opts.opset_version,
        "dtype": opts.dtype,
        "onnx_bytes": sum(p.stat().st_size for p in output.glob("model.onnx*")),
        "files": files,
        "inputs": ["input_ids [batch, sequence]", "attention_mask [batch, sequence]"],
        "outputs": ["logits [batch, sequence, vocab]"],
        "verification": verification,
    }


def export_merged(
    model_path: Path, output: Path, req: dict[str, Any], store: TaskStore, task_id: str
) -> dict[str, Any]:
    """Merge a LoRA into its base, save a plain model folder, and check its logits against the adapter's."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = models.load_tokenizer(models.tokenizer_dir(model_path))
    base = models.load_causal_lm(Path(models.adapter_base(model_path)), "float32", "cpu")
    adapter_model = PeftModel.from_pretrained(base, str(model_path)).eval()
    batch = verify_batch(tokenizer)
    adapter_logits = torch_logits(adapter_model, batch)
    merged = adapter_model.merge_and_unload().eval()
    merged_logits = torch_logits(merged, batch)
    staging = fresh_dir(output)
    try:
        dtype = _base_dtype(Path(models.adapter_base(model_path)))
        merged.to(getattr(torch, dtype)).save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        verification = compare_logits(adapter_logits, merged_logits, batch["attention_mask"], MERGE_TOLERANCE)
        # The saved folder must load back to exactly the merged weights (in the base's storage dtype).
        reloaded = AutoModelForCausalLM.from_pretrained(str(staging), dtype=getattr(torch, dtype)).state_dict()
        expected = merged.state_dict()
        differing = [k for k, v in expected.items() if k not in reloaded or not torch.equal(reloaded[k], v)]
        verification["saved_folder"] = {"tensors": len(expected), "differing": differing[:20]}
        verification["passed"] = verification["passed"] and not differing
        require(verification)
        publish(staging, output, TaskKind.export, task_id, format="merged")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    store.add_event(task_id, "log", f"merged; max |adapter - merged| = {verification['max_abs_diff']:.2e}")
    return {
        "format": "merged",
        "source": str(model_path),
        "base_model": models.adapter_base(model_path),
        "output_path": str(output),
        "dtype": dtype,
        "files": sorted(p.name for p in output.iterdir() if p.name != OUTPUT_MARKER),
        "verification": verification,
    }


def _base_dtype(base: Path) -> str:
    """The dtype a base model folder was saved in (float32 when its config does not say)."""
    try:
        cfg = read_json(base / "config.json")
    except (OSError, ValueError):
        return "float32"
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return dtype if dtype in ("float32", "float16", "bfloat16") else "float32"


def archive_readme(model_path: Path, adapter: bool, base: str) -> str:
    """The README placed in an archive: what it holds and the lines that load it."""
    name = model_path.name
    if adapter:
        body = f"""This archive holds a LoRA adapter ({name}) for the base model `{Path(base).name}`,
with its tokenizer, training arguments and training log.

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("path/to/{Path(base).name}")
model = PeftModel.from_pretrained(base, "{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
merged = model.merge_and_unload()  # optional: a plain model without PEFT
```
"""
    else:
        body = f"""This archive holds a full model ({name}) with its tokenizer, training arguments and log.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
```
"""
    return f"# {name}\n\n{body}\nExtract with `tar -xzf {name}.tar.gz`. Exported by Win-Train.\n"


def export_archive(
    model_path: Path, output: Path, req: dict[str, Any], store: TaskStore, task_id: str
) -> dict[str, Any]:
    """Write a tar.gz of the model folder (without checkpoints) plus a README, then re-read and check it."""
    adapter = models.is_adapter_dir(model_path)
    base = models.adapter_base(model_path) if adapter else ""
    tok_dir = models.tokenizer_dir(model_path)
    root = model_path.name
    members: dict[str, Path] = {}
    for path in sorted(model_path.rglob("*")):
        rel = path.relative_to(model_path)
        # Our README (with the loading lines) replaces the generated model card; links are never archived.
        skipped = rel.as_posix() == "README.md" or any(p.startswith(ARCHIVE_SKIP) for p in rel.parts)
        if path.is_file() and not path.is_symlink() and not skipped:
            members[f"{root}/{rel.as_posix()}"] = path
    if tok_dir != model_path:  # an adapter without its own tokenizer: take its base's
        for path in tok_dir.iterdir():
            if path.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
                if not path.is_symlink():
                    members.setdefault(f"{root}/{path.name}", path)
    output.parent.mkdir(parents=True, exist_ok=True)
    # A new name, created exclusively: a link planted at a predictable staging name is never written through.
    fd, name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent)
    staging = Path(name)
    readme = archive_readme(model_path, adapter, base).encode("utf-8")
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w:gz") as tar:
            for arcname, path in members.items():
                tar.add(path, arcname=arcname, recursive=False)
            info = tarfile.TarInfo(f"{root}/README.md")
            info.size, info.mtime = len(readme), int(time.time())
            tar.addfile(info, io.BytesIO(readme))
        verification = verify_archive(staging, members, root, adapter)
        require(verification)
        publish(staging, output, TaskKind.export, task_id, format="archive")
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    store.add_event(task_id, "log", f"archived {len(members) + 1} files into {output.name}")
    return {
        "format": "archive",
        "source": str(model_path),
        "kind": "lora_adapter" if adapter else "full_model",
        "base_model": base or None,
        "output_path": str(output),
        "bytes": output.stat().st_size,
        "sha256": _sha256(output),
        "files": sorted([*members, f"{root}/README.md"]),
        "download": f"/api/export/download/{task_id}",
        "verification": verification,
    }


def verify_archive(path: Path, members: dict[str, Path], root: str, adapter: bool) -> dict[str, Any]:
    """Re-open the archive: every file is there with its size, and the model's config parses."""
    with tarfile.open(path, "r:gz") as tar:
        listed = tar.getmembers()
        names = {m.name: m for m in listed}
        missing = [n for n in members if n not in names]
        wrong_size = [n for n, p in members.items() if n in names and names[n].size != p.stat().st_size]
        config_name = f"{root}/{'adapter_config.json' if adapter else 'config.json'}"
        try:
            json.loads(tar.extractfile(names[config_name]).read())  # type: ignore[union-attr]
            config_ok = True
        except (KeyError, ValueError, AttributeError):
            config_ok = False
        has_tokenizer = any(n.startswith(f"{root}/tokenizer") for n in names)
    return {
        "members": len(listed),
        "duplicates": len(listed) - len(names),
        "missing": missing,
        "size_mismatch": wrong_size,
        "config_parses": config_ok,
        "has_tokenizer": has_tokenizer,
        "passed": len(listed) == len(names) and not missing and not wrong_size and config_ok and has_tokenizer,
    }


def _sha256(path: Path) -> str:
    """The SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
