"""Evaluation API: token-weighted loss, accuracy modes, compare_with, wait, evalscope, bad input."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import add_task, wait_for, write_jsonl
from entity.task import TaskStatus
from service import models
from service.eval import final_number, score

QA = [
    {
        "messages": [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "2 + 2 = 4. #### 4"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name the capital of France, please, in one word."},
            {"role": "assistant", "content": "Paris"},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome is the capital of Italy, and it is a long answer on purpose."},
        ]
    },
]


def _evaluate(client, **body):
    payload = {"dataset_path": "eval/qa.jsonl", "wait": True, "batch_size": 2}
    payload.update(body)
    return client.post("/api/eval/evaluate", json=payload)


def _results(r) -> dict:
    assert r.status_code == 200, r.text
    task = r.json()["task"]
    assert task["status"] == "succeeded", task["error"]
    return task["metrics"]


@pytest.fixture
def qa_file(settings):
    return write_jsonl(settings.data_dir / "eval" / "qa.jsonl", QA)


def _hand_loss(model_dir, tokenizer_dir) -> tuple[float, int, float]:
    """Per record, one at a time: summed NLL of assistant tokens over their count (and the mean of record means)."""
    tok = models.load_tokenizer(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count, means = 0.0, 0, []
    for record in QA:
        before = (total, count)
        enc = models.tokenize_with_assistant_mask(tok, record["messages"])
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        for pos in range(1, ids.shape[1]):
            if enc["assistant_masks"][pos]:
                total += float(-F.log_softmax(logits[pos - 1], -1)[ids[0, pos]])
                count += 1
        means.append((total - before[0]) / (count - before[1]))
    return total / count, count, sum(means) / len(means)


def test_loss_and_perplexity_match_a_hand_computation(client, settings, qa_file):
    results = _results(_evaluate(client, metrics=["loss", "perplexity"]))
    base = settings.base_model_path()
    expected, tokens, mean_of_means = _hand_loss(base, base)
    metrics = results["metrics"]
    assert metrics["assistant_tokens"] == tokens
    assert metrics["loss"] == pytest.approx(expected, abs=1e-4)
    assert metrics["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)
    # Token-weighted: the longer second answer counts for more than a mean of per-record means gives it.
    assert abs(metrics["loss"] - mean_of_means) > 1e-3
    saved = json.loads((settings.data_dir / "evals" / r_id(client) / "evaluation_results.json").read_text())
    assert saved["results"]["metrics"]["loss"] == metrics["loss"]
    assert saved["config"]["metrics"] == ["loss", "perplexity"]


def r_id(client) -> str:
    """The newest eval task's id."""
    return client.get("/api/train/tasks?kind=eval&limit=1").json()["items"][0]["id"]


def test_accuracy_modes_on_known_answers():
    assert final_number("so the total is 70 and then 72. #### 72") == 72
    assert final_number("Answer: 1,234 apples, not 5") == 1234
    assert final_number("The answer is -3.5.") == -3.5
    assert final_number("first 3 then 12") == 12
    assert final_number("no digits here") is None
    assert score("  Paris\n", "paris") == {"exact_match": True, "contains": True, "numeric": False}
    assert score("It is Paris, of course.", "Paris") == {"exact_match": False, "contains": True, "numeric": False}
    assert score("The answer is 72.0", "She has 72 left. #### 72") == {
        "exact_match": False,
        "contains": False,
        "numeric": True,
    }
    assert score("Rome", "Paris") == {"exact_match": False, "contains": False, "numeric": False}


def test_accuracy_writes_predictions_and_per_example_flags(client, settings, qa_file):
    results = _results(
        _evaluate(
            client, metrics=["accuracy", "bleu", "rouge_l"], accuracy_mode="contains", generation={"max_tokens": 6}
        )
    )
    metrics = results["metrics"]
    for key in ("accuracy", "exact_match", "contains", "numeric", "bleu", "rouge_l"):
        assert key in metrics
    assert metrics["accuracy"] == metrics["contains"]
    saved = json.loads((settings.data_dir / "evals" / r_id(client) / "evaluation_results.json").read_text())
    predictions = saved["predictions"]
    assert [p["reference"] for p in predictions] == [QA[0]["messages"][-1]["content"], QA[1]["messages"][-1]["content"]]
    assert predictions[1]["prompt"] == "And of Italy?"
    for p in predictions:
        assert p["correct"] == score(p["prediction"], p["reference"])["contains"]
    assert metrics["accuracy"] == sum(p["correct"] for p in predictions) / 2


def test_compare_with_reports_both_models_and_deltas(client, settings, qa_file, adapter_dir):
    task_id = add_task(client, TaskStatus.succeeded, str(adapter_dir))
    r = _evaluate(
        client, model=task_id, compare_with="tiny-llama", metrics=["loss", "accuracy"], generation={"max_tokens": 8}
    )
    results = _results(r)
    primary, other = results["metrics"], results["compare_with"]["metrics"]
    assert results["compare_with"]["model"] == "tiny-llama"
    assert results["delta"]["loss"] == pytest.approx(primary["loss"] - other["loss"])
    assert results["better"]["loss"] == (primary["loss"] < other["loss"])
    base_loss, _, _ = _hand_loss(settings.base_model_path(), settings.base_model_path())
    assert other["loss"] == pytest.approx(base_loss, abs=1e-4)
    assert primary["loss"] != pytest.approx(other["loss"], abs=1e-6)


def test_without_wait_returns_202_then_status(client, qa_file):
    r = _evaluate(client, wait=False, metrics=["loss"])
    assert r.status_code == 202
    task_id = r.json()["task_id"]
    final = wait_for(client, task_id, {"succeeded", "failed"})
    assert final["status"] == "succeeded", final["error"]
    assert client.get(f"/api/eval/status/{task_id}").json()["metrics"]["metrics"]["loss"] > 0
    assert task_id in [t["id"] for t in client.get("/api/train/tasks?kind=eval").json()["items"]]


def test_evalscope_general_qa_on_local_file(client, settings):
    rows = [
        {"query": "What is 2+2?", "response": "4"},
        {"query": "Capital of France?", "response": "Paris"},
        {"query": "Colour of the sky?", "response": "blue"},
    ]
    write_jsonl(settings.data_dir / "eval" / "es.jsonl", rows)
    r = _evaluate(client, dataset_path="eval/es.jsonl", backend="evalscope", generation={"max_tokens": 4})
    results = _results(r)
    assert results["backend"] == "evalscope"
    report = results["report"]["general_qa"]
    assert report["num"] == 3
    names = [m["metric"] for m in report["metrics"]]
    assert any(n.startswith("bleu") for n in names) and any(n.startswith("rouge") for n in names)


def test_failure_inside_the_task_is_readable(client, settings):
    long = [{"messages": [{"role": "user", "content": "word " * 1500}, {"role": "assistant", "content": "ok"}]}]
    write_jsonl(settings.data_dir / "eval" / "long.jsonl", long)
    r = _evaluate(client, dataset_path="eval/long.jsonl", metrics=["accuracy"])
    assert r.status_code == 200
    task = r.json()["task"]
    assert task["status"] == "failed"
    assert "context" in task["error"]


def test_eval_bad_input(client, settings, qa_file):
    no_answer = [{"messages": [{"role": "user", "content": "hello?"}]}]
    write_jsonl(settings.data_dir / "eval" / "no_answer.jsonl", no_answer)
    (settings.data_dir / "eval" / "empty.jsonl").write_text("")
    r = _evaluate(client, dataset_path="eval/no_answer.jsonl")
    assert r.status_code == 422 and "assistant" in r.json()["error"]["message"]
    assert _evaluate(client, dataset_path="eval/empty.jsonl").status_code == 422
    assert _evaluate(client, metrics=["f1"]).status_code == 422
    assert _evaluate(client, metrics=[]).status_code == 422
    assert _evaluate(client, metrics=["loss", "loss"]).status_code == 422
    assert _evaluate(client, model="no-such-model").status_code == 404
    assert _evaluate(client, compare_with="no-such-model").status_code == 404
    assert _evaluate(client, dataset_path="eval/missing.jsonl").status_code == 404
    assert _evaluate(client, dataset_path="/etc/passwd").status_code == 403
    r = _evaluate(client, dataset_path="eval/qa.jsonl", backend="evalscope", evalscope_dataset="general_mcq")
    assert r.status_code == 422 and "MCQ" in r.json()["error"]["message"]
    assert client.get("/api/train/tasks?kind=eval").json()["total"] == 0  # nothing was queued
    (settings.data_dir / "evals" / "done").mkdir(parents=True)
    (settings.data_dir / "evals" / "done" / "evaluation_results.json").write_text("{}")
    assert _evaluate(client, output_dir="evals/done").status_code == 409
