"""An eval task counts its progress per record (each phase, each model) and gives an ETA."""

from conftest import wait_for, write_jsonl

RECORDS = [
    {"messages": [{"role": "user", "content": f"Capital of country {i}?"}, {"role": "assistant", "content": f"C{i}"}]}
    for i in range(5)
]


def test_eval_progress_is_per_record_with_eta(client, settings):
    write_jsonl(settings.data_dir / "qa.jsonl", RECORDS)
    body = {
        "dataset_path": "qa.jsonl",
        "compare_with": "tiny-llama",
        "metrics": ["loss", "accuracy"],
        "batch_size": 2,
        "generation": {"max_tokens": 4},
    }
    r = client.post("/api/eval/evaluate", json=body)
    assert r.status_code == 202, r.text
    task_id = r.json()["task_id"]
    task = wait_for(client, task_id, {"succeeded", "failed"})
    assert task["status"] == "succeeded", task["error"]
    # 5 records x (teacher-forced loss + generation) x 2 models
    assert task["total_steps"] == 20 and task["current_step"] == 20 and task["progress"] == 100.0
    assert task["eta_seconds"] == 0.0
