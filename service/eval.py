"""Evaluation: loss, perplexity, accuracy, BLEU and ROUGE-L on held-out chats, or evalscope benchmarks.

The service half (EvalService) checks a request and queues an eval task; the worker half (run_eval) runs
in the task's child process and writes evaluation_results.json.
"""

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from entity.eval import EvalRequest
from entity.inference import ChatRequest
from entity.task import TaskKind, TaskRow
from service import models
from service.data import load_conversations, read_records
from service.engine import EngineConfig
from service.jobs import JobRunner
from service.models import LoadedModel, ModelCache
from service.tasks import TaskStore
from util.errors import ConflictError, InvalidInputError, NotFoundError
from util.files import check_replaceable, claim_fresh, release, write_json
from util.paths import resolve_in_roots, resolve_output
from util.settings import Settings

log = logging.getLogger(__name__)

Message = dict[str, str]
MCQ_FIELDS = ("question", "A", "B", "C", "D", "answer")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
RESULTS_FILE = "evaluation_results.json"
HIGHER_IS_BETTER = {"accuracy", "exact_match", "contains", "numeric", "bleu", "rouge_l"}


# -- scoring ---------------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """Lower-case and collapse whitespace."""
    return " ".join(text.lower().split())


def final_number(text: str) -> float | None:
    """The answer's number, GSM8K-style: after '####', else after the last 'answer:', else the last number."""
    for marker in ("####", "answer:", "answer is"):
        idx = text.lower().rfind(marker)
        if idx >= 0:
            found = NUMBER.findall(text[idx + len(marker) :])
            if found:
                return _to_float(found[0])
    found = NUMBER.findall(text)
    return _to_float(found[-1]) if found else None


def _to_float(token: str) -> float | None:
    """Parse '1,234.5' as 1234.5."""
    try:
        return float(token.replace(",", ""))
    except ValueError:
        return None


def score(prediction: str, reference: str) -> dict[str, bool]:
    """The three accuracy comparisons of one answer."""
    pred, ref = normalize(prediction), normalize(reference)
    ref_num, pred_num = final_number(reference), final_number(prediction)
    return {
        "exact_match": pred == ref,
        "contains": bool(ref) and ref in pred,
        "numeric": ref_num is not None and pred_num is not None and math.isclose(pred_num, ref_num, abs_tol=1e-6),
    }


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score), 0-1."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    values = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return float(sum(values) / len(values)) if values else 0.0


class RecordProgress:
    """Per-record progress of an eval task (each record once per phase and model), with an ETA from the pace."""

    def __init__(self, store: TaskStore, task_id: str, total: int) -> None:
        """Start at 0 of `total` record-steps."""
        self.store, self.task_id, self.total, self.done = store, task_id, max(total, 1), 0
        self.started = time.monotonic()
        store.update_progress(task_id, current_step=0, total_steps=self.total, progress=0.0)

    def advance(self, records: int) -> None:
        """Count `records` more as done and store progress and ETA."""
        self.done = min(self.done + records, self.total)
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        self.store.update_progress(
            self.task_id,
            current_step=self.done,
            total_steps=self.total,
            progress=round(100 * self.done / self.total, 1),
            eta_seconds=None if eta is None else round(eta, 1),
        )


def teacher_forced_nll(
    loaded: LoadedModel,
    conversations: list[list[Message]],
    batch_size: int,
    max_length: int,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[float, int]:
    """Summed next-token NLL over assistant tokens only, and their count (token-weighted, not a mean of means)."""
    import torch
    import torch.nn.functional as F

    tok, model = loaded.tokenizer, loaded.model
    rows = []
    for conv in conversations:
        enc = models.tokenize_with_assistant_mask(tok, conv)
        rows.append((enc["input_ids"][:max_length], enc["assistant_masks"][:max_length]))
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for i, (row_ids, mask) in enumerate(chunk):
            n = len(row_ids)
            ids[i, :n] = torch.tensor(row_ids)
            attention[i, :n] = 1
            labels[i, :n] = torch.where(torch.tensor(mask) == 1, torch.tensor(row_ids), -100)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(loaded.device), attention_mask=attention.to(loaded.device)).logits
        shifted = labels[:, 1:].to(loaded.device)
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            shifted.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += float(nll)
        count += int((shifted != -100).sum())
        if on_batch is not None:
            on_batch(len(chunk))
    return total, count


# -- service half: request checks and queueing ----------------------------------------------------------


class EvalService:
    """Checks eval requests up front (data, metrics, models, paths) and queues them as eval tasks."""

    def __init__(self, settings: Settings, runner: JobRunner) -> None:
        """Bind to settings and the job runner."""
        self.settings = settings
        self.runner = runner

    def _dataset(self, raw: str, backend: str, benchmark: str) -> Path:
        """Resolve the dataset and check it holds something to evaluate."""
        path = resolve_in_roots(raw, self.settings.data_dir, self.settings)
        if not path.is_file():
            raise NotFoundError(f"dataset_path '{raw}' does not exist.", details={"dataset_path": raw})
        if backend == "evalscope" and benchmark == "general_mcq":
            rows = [r.obj for r in read_records(path) if r.error is None and isinstance(r.obj, dict)]
            if not rows or any(not all(f in r for f in MCQ_FIELDS) for r in rows):
                raise InvalidInputError(
                    f"dataset_path '{raw}' is not an MCQ file: every record needs {', '.join(MCQ_FIELDS)}.",
                    details={"dataset_path": raw},
                )
            return path
        if backend == "evalscope" and qa_records(path):
            return path
        if not load_conversations(path):
            raise InvalidInputError(
                f"dataset_path '{raw}' has no usable records: each conversation must end with an assistant turn "
                "(the reference answer). Run /api/data/validate to see why records were rejected.",
                details={"dataset_path": raw},
            )
        return path

    def start(self, req: EvalRequest) -> TaskRow:
        """Check everything that can be checked now, then queue the eval task."""
        dataset = self._dataset(req.dataset_path, req.backend, req.evalscope_dataset)
        model = models.resolve_model_ref(req.model_ref, self.settings, self.runner.store)
        compare = None
        if req.compare_with is not None:
            compare = models.resolve_model_ref(req.compare_with, self.settings, self.runner.store)
        if req.backend == "evalscope" and compare is not None:
            raise InvalidInputError("compare_with is only supported with the native backend.")
        task_id = self.runner.store.new_id()
        name = req.output_dir or f"evals/{task_id}"
        output = resolve_output(name, self.settings.data_dir, self.settings)
        if output.exists() and not output.is_dir():
            raise ConflictError(f"output_dir '{name}' is a file.", details={"output_dir": name})
        check_replaceable(output, TaskKind.eval, name)
        if (output / RESULTS_FILE).exists():
            raise ConflictError(f"output_dir '{name}' already holds evaluation results; choose another.")
        busy = self.runner.store.active_with_output(str(output))
        if busy:
            raise ConflictError(f"Task {busy[0].id} is already writing to '{name}'.", details={"output_dir": name})
        request = {
            "eval": req.model_dump(),
            "resolved": {
                "dataset_path": str(dataset),
                "model_path": str(model),
                "compare_path": str(compare) if compare else None,
                "output_dir": str(output),
            },
        }
        return self.runner.submit(TaskKind.eval, request, str(output), task_id)


# -- worker half ------------------------------------------------------------------------------------------


def split_turns(conv: list[Message]) -> tuple[list[Message], str]:
    """The prompt (every turn before the last assistant turn) and the reference answer."""
    return conv[:-1], conv[-1]["content"]


def evaluate_model(
    settings: Settings,
    store: TaskStore,
    task_id: str,
    path: Path,
    conversations: list[list[Message]],
    req: EvalRequest,
    progress: RecordProgress,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every requested metric of one model, and its per-example predictions."""
    from service.inference import InferenceService

    # Loss and perplexity run the model outside the engine, so an adapter is merged rather than routed.
    cache = ModelCache(1, EngineConfig.from_settings(settings.inference), share_adapters=False)
    loaded = cache.get(path)
    metrics: dict[str, Any] = {}
    if {"loss", "perplexity"} & set(req.metrics):
        nll, tokens = teacher_forced_nll(
            loaded, conversations, req.batch_size, settings.train.max_length, progress.advance
        )
        loss = nll / tokens if tokens else None
        if "loss" in req.metrics:
            metrics["loss"] = loss
        if "perplexity" in req.metrics:
            metrics["perplexity"] = math.exp(loss) if loss is not None and loss < 700 else None
        metrics["assistant_tokens"] = tokens
    predictions: list[dict[str, Any]] = []
    if {"accuracy", "bleu", "rouge_l"} & set(req.metrics):
        service = InferenceService(settings, store, cache)
        requests = []
        for conv in conversations:
            prompt, _ = split_turns(conv)
            requests.append(
                ChatRequest(
                    model=req.model_ref,
                    messages=prompt,
                    max_tokens=req.generation.max_tokens,
                    temperature=req.generation.temperature,
                    seed=0,
                )
            )
        answers = []
        # The engine decodes up to max_concurrent_generations answers together; progress moves once per such chunk.
        step = max(req.batch_size, settings.inference.max_concurrent_generations)
        for start in range(0, len(requests), step):
            chunk = requests[start : start + step]
            answers += service.answer_many(chunk, step, path)
            progress.advance(len(chunk))
        for i, (conv, answer) in enumerate(zip(conversations, answers, strict=True)):
            prompt, reference = split_turns(conv)
            marks = score(answer.content, reference)
            predictions.append(
                {
                    "index": i,
                    "prompt": prompt[-1]["content"],
                    "reference": reference,
                    "prediction": answer.content,
                    **marks,
                    "correct": marks[req.accuracy_mode],
                }
            )
        preds = [p["prediction"] for p in predictions]
        refs = [p["reference"] for p in predictions]
        if "accuracy" in req.metrics:
            n = len(predictions)
            for mode in ("exact_match", "contains", "numeric"):
                metrics[mode] = sum(p[mode] for p in predictions) / n
            metrics["accuracy"] = metrics[req.accuracy_mode]
        if "bleu" in req.metrics:
            metrics["bleu"] = bleu(preds, refs)
        if "rouge_l" in req.metrics:
            metrics["rouge_l"] = rouge_l(preds, refs)
    cache.close()  # stop the engine's thread and free the model before the next one loads
    return metrics, predictions


def run_eval(settings: Settings, store: TaskStore, task_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """Run one eval task; write evaluation_results.json and return the results.

    The output folder is claimed fresh (links planted in it dropped; checked at request time too, the folder may
    have changed since) and stays private (0700) until the task ends.
    """
    output = Path(request["resolved"]["output_dir"])
    claim_fresh(output, TaskKind.eval, task_id)
    try:
        return _evaluate(settings, store, task_id, request, output)
    finally:
        release(output, TaskKind.eval, task_id)


def _evaluate(
    settings: Settings, store: TaskStore, task_id: str, request: dict[str, Any], output: Path
) -> dict[str, Any]:
    """The body of run_eval: evaluate and write the results into the claimed `output`."""
    req = EvalRequest.model_validate(request["eval"])
    resolved = request["resolved"]
    dataset, model_path = Path(resolved["dataset_path"]), Path(resolved["model_path"])
    models.check_model_sources(model_path, settings)  # again here: an adapter's files may have changed since
    if resolved.get("compare_path"):
        models.check_model_sources(Path(resolved["compare_path"]), settings)
    if req.backend == "evalscope":
        result = run_evalscope(model_path, dataset, req, output, store, task_id)
        write_json(output / RESULTS_FILE, {"results": result, "config": req.model_dump(), "resolved": resolved})
        return result
    conversations = load_conversations(dataset)[: req.max_samples]
    if not conversations:
        raise ValueError(f"{dataset} has no usable conversations.")
    compare_path = Path(resolved["compare_path"]) if resolved.get("compare_path") else None
    phases = bool({"loss", "perplexity"} & set(req.metrics)) + bool({"accuracy", "bleu", "rouge_l"} & set(req.metrics))
    progress = RecordProgress(store, task_id, len(conversations) * phases * (2 if compare_path else 1))
    store.add_event(task_id, "log", f"evaluating {model_path.name} on {len(conversations)} records: {req.metrics}")
    primary, predictions = evaluate_model(settings, store, task_id, model_path, conversations, req, progress)
    result: dict[str, Any] = {"model": req.model_ref or settings.models.base_model, "samples": len(conversations)}
    result["metrics"] = primary
    details: dict[str, Any] = {"predictions": predictions}
    if compare_path is not None:
        store.add_event(task_id, "log", f"evaluating {compare_path.name} for comparison")
        other, other_predictions = evaluate_model(settings, store, task_id, compare_path, conversations, req, progress)
        result["compare_with"] = {"model": req.compare_with, "metrics": other}
        result["delta"] = {
            k: v - other[k]
            for k, v in primary.items()
            if isinstance(v, (int, float)) and isinstance(other.get(k), (int, float))
        }
        result["better"] = {
            k: (d > 0 if k in HIGHER_IS_BETTER else d < 0)
            for k, d in result["delta"].items()
            if k != "assistant_tokens"
        }
        details["compare_predictions"] = other_predictions
    write_json(output / RESULTS_FILE, {"results": result, "config": req.model_dump(), "resolved": resolved, **details})
    result["results_file"] = str(output / RESULTS_FILE)
    return result


# -- evalscope backend ------------------------------------------------------------------------------------


def qa_records(path: Path) -> list[dict[str, str]]:
    """A QA file's records as evalscope's general_qa wants them ({"query", "response"})."""
    rows = [r.obj for r in read_records(path) if r.error is None and isinstance(r.obj, dict)]
    if rows and all("query" in r and "response" in r for r in rows):
        return [{"query": str(r["query"]), "response": str(r["response"])} for r in rows]
    return []


def chat_to_qa(conversations: list[list[Message]]) -> list[dict[str, str]]:
    """Chats as query/response pairs: the last user turn is the query, the final answer the response."""
    return [{"query": conv[-2]["content"], "response": conv[-1]["content"]} for conv in conversations if len(conv) >= 2]


def offline_nltk(root: Path) -> None:
    """Point NLTK at empty punkt_tab files so BLEU does not try to download them (ENV_NOTES)."""
    folder = root / "tokenizers" / "punkt_tab" / "english"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (folder / name).touch()
    os.environ["NLTK_DATA"] = str(root)


def run_evalscope(
    model_path: Path, dataset: Path, req: EvalRequest, output: Path, store: TaskStore, task_id: str
) -> dict[str, Any]:
    """Run evalscope's general_qa or general_mcq on the local file with the local model, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MODELSCOPE_OFFLINE", "1")
    work = output / "evalscope"
    shutil.rmtree(work, ignore_errors=True)
    data_dir = work / "data"
    data_dir.mkdir(parents=True)
    offline_nltk(work / "nltk_data")
    if req.evalscope_dataset == "general_mcq":
        shutil.copyfile(dataset, data_dir / "example_val.jsonl")
    else:
        records = qa_records(dataset) or chat_to_qa(load_conversations(dataset))
        lines = [json.dumps(r, ensure_ascii=False) for r in records[: req.max_samples]]
        (data_dir / "example.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if models.is_adapter_dir(model_path):  # evalscope loads a plain model folder: merge the LoRA first
        merged = work / "merged-model"
        models.load_for_inference(model_path, "float32", "cpu").save_pretrained(merged)
        models.load_tokenizer(models.tokenizer_dir(model_path)).save_pretrained(merged)
        model_path = merged
    from evalscope import TaskConfig, run_task

    store.add_event(task_id, "log", f"running evalscope {req.evalscope_dataset} on {dataset.name}")
    cfg = TaskConfig(
        model=str(model_path),
        eval_type="llm_ckpt",
        datasets=[req.evalscope_dataset],
        dataset_args={req.evalscope_dataset: {"local_path": str(data_dir), "subset_list": ["example"]}},
        generation_config={"max_tokens": req.generation.max_tokens, "temperature": req.generation.temperature},
        eval_batch_size=req.batch_size,
        limit=req.max_samples,
        work_dir=str(work / "outputs"),
        no_timestamp=True,
    )
    report = run_task(cfg)
    return {"backend": "evalscope", "dataset": req.evalscope_dataset, "report": summarize_report(report)}


def summarize_report(reports: Any) -> dict[str, Any]:
    """The {dataset: Report} of evalscope as plain JSON: each metric's name, dimensions, score and count."""
    summary: dict[str, Any] = {}
    for dataset, report in dict(reports or {}).items():
        metrics = []
        for metric in getattr(report, "metrics", []) or []:
            identity = getattr(metric, "identity", None)
            name = getattr(identity, "name", None) or getattr(metric, "name", "metric")
            dims = dict(getattr(identity, "dimensions", {}) or {})
            label = name + "".join(f"_{k}-{v}" for k, v in sorted(dims.items()))
            metrics.append({"metric": label, "score": _json_number(metric.score), "num": getattr(metric, "num", None)})
        primary = getattr(report, "primary_metric_identity", None)
        summary[str(dataset)] = {
            "num": getattr(report, "num", None),
            "primary_metric": getattr(primary, "name", None),
            "primary_dimensions": dict(getattr(primary, "dimensions", {}) or {}),
            "metrics": metrics,
        }
    return summary


def _json_number(value: Any) -> float | None:
    """A finite float, or None."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
