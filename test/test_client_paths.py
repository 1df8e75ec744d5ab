"""Responses show paths relative to their root, with the root's role, never the server's absolute paths."""

from conftest import SAMPLE, wait_for

FAST = {"max_steps": 1, "per_device_train_batch_size": 2, "save_steps": 1}


def test_pipeline_responses_carry_root_relative_paths(client, settings):
    server_paths = [str(settings.data_dir), str(settings.model_dir), str(settings.data_dir.parent)]
    seen = []

    def call(method: str, url: str, **kwargs):
        r = client.request(method, url, **kwargs)
        assert r.status_code < 300, r.text
        seen.append(r.text)
        return r.json()

    up = call("POST", "/api/data/upload", files={"file": ("train_sample.json", SAMPLE.read_bytes())})
    assert (up["file_path"], up["root"]) == ("uploads/train_sample.json", "data")
    assert call("POST", "/api/data/validate", json={"file_path": up["file_path"]})["file_path"] == up["file_path"]
    preview = call("GET", "/api/data/preview", params={"file_path": up["file_path"], "limit": 1})
    assert preview["file_path"] == up["file_path"]
    done = call("POST", "/api/data/process", json={"input_file": up["file_path"], "output_dir": "sample"})
    assert (done["output_dir"], done["output_root"], done["input_file"]) == ("sample", "data", up["file_path"])
    assert done["splits"]["train"]["path"] == "sample/train.jsonl"
    assert (settings.data_dir / done["splits"]["train"]["path"]).is_file()

    started = call(
        "POST", "/api/train/start", json={"strategy": "lora", "dataset_path": "sample/train.jsonl", "config": FAST}
    )
    assert (started["output_dir"], started["output_root"]) == (f"outputs/{started['task_id']}", "model")
    task = wait_for(client, started["task_id"], {"succeeded", "failed"})
    assert task["status"] == "succeeded", task["error"]
    assert (task["output_dir"], task["output_root"]) == (started["output_dir"], "model")
    seen.append(client.get("/api/train/tasks").text)
    seen.append(client.get(f"/api/tasks/{started['task_id']}/files").text)
    # The relative output is what a client sends back: chat with the model folder by that name.
    r = client.post(
        "/api/inference/chat",
        json={"model": task["output_dir"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
    for text in seen:
        assert not any(p in text for p in server_paths), text
