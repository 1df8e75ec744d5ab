"""The auto token budget: sized from the model, the strategy and a memory figure; recorded in the task."""

import json

import pytest
from fastapi.testclient import TestClient

from conftest import SAMPLE, wait_for
from entity.train import TrainConfig, TrainRequest
from main import create_app
from service.train.budget import (
    GIB,
    MARGIN,
    RESERVE,
    ModelShape,
    apply_budget,
    choose_budget,
    peak_bytes,
    resolve_steps,
)

# The bench's model (bench/NOTES.md): Qwen2-0.5B's shape with SmolLM2's 49k vocabulary, 0.40B parameters, bf16.
QWEN = ModelShape(params=402_000_000, layers=24, hidden=896, intermediate=4864, vocab=49_152, weight_bytes=2)
PLENTY = 10**9  # dataset tokens that never limit the budget
H100_FREE = int(79.1 * GIB)


def _tokens_that_fit(free: int, static: int, per_token: int) -> int:
    return int((free * (1 - MARGIN) - RESERVE - static) // per_token)


def test_formula_matches_the_h100_measurements():
    """bench/NOTES.md: peak memory of the service path at 8k/16k/32k tokens, with and without checkpointing."""
    measured = {(8192, False): 10.85, (16384, False): 18.89, (32768, False): 34.96, (8192, True): 3.49}
    measured[(32768, True)] = 5.36
    for (tokens, ckpt), gib in measured.items():
        predicted = peak_bytes(QWEN, tokens, None, ckpt, fused_loss=True) / GIB
        assert predicted == pytest.approx(gib, rel=0.06), (tokens, ckpt, predicted)
        assert predicted >= gib * 0.98  # never much below what was measured


def test_a_free_h100_gets_the_cap_without_checkpointing():
    budget = choose_budget(QWEN, H100_FREE, 1024, PLENTY, cap=32768)
    assert (budget.tokens_per_step, budget.rows, budget.limit) == (32768, 32, "cap")
    assert not budget.gradient_checkpointing
    assert budget.predicted_peak_gib == pytest.approx(34.87, abs=0.05)
    assert budget.free_memory_gib == pytest.approx(79.1)
    assert "max_tokens_per_step=32768" in budget.reason
    assert choose_budget(QWEN, H100_FREE, 1024, PLENTY, cap=65536).tokens_per_step == 65536  # memory allows it


def test_memory_bound_budget_is_the_formula_in_whole_rows():
    free = 24 * GIB
    budget = choose_budget(QWEN, free, 1024, PLENTY, cap=32768)
    fits = _tokens_that_fit(free, 8 * QWEN.params, 24 * 2 * (8 * 896 + 3 * 4864))
    assert budget.limit == "memory" and not budget.gradient_checkpointing
    assert budget.rows == fits // 1024 == 16 and budget.tokens_per_step == 16384
    assert budget.predicted_peak_gib * GIB <= free * (1 - MARGIN) - RESERVE


def test_lora_fits_a_bigger_budget_than_full_sft():
    full = choose_budget(QWEN, 24 * GIB, 1024, PLENTY, cap=32768)
    lora = choose_budget(QWEN, 24 * GIB, 1024, PLENTY, cap=32768, lora_rank=16)
    adapter = 16 * 24 * (10 * 896 + 3 * 4864)
    fits = _tokens_that_fit(24 * GIB, 2 * QWEN.params + 16 * adapter, 24 * 2 * (8 * 896 + 3 * 4864) + 24 * 2 * 7 * 16)
    assert lora.rows == fits // 1024 == 18 > full.rows


def test_a_small_gpu_switches_checkpointing_on_and_resizes_for_it():
    free = 8 * GIB
    budget = choose_budget(QWEN, free, 1024, PLENTY, cap=32768)
    plain = _tokens_that_fit(free, 8 * QWEN.params, 24 * 2 * (8 * 896 + 3 * 4864))
    ckpt = _tokens_that_fit(free, 8 * QWEN.params, 24 * 2 * 896 + 2 * (8 * 896 + 3 * 4864))
    assert plain < 16384  # without checkpointing the steps would wait on the host
    assert budget.gradient_checkpointing and budget.limit == "memory"
    assert budget.rows == ckpt // 1024 == 26
    assert f"without it only {plain} tokens fit" in budget.reason
    # The user's explicit choice stays: no checkpointing, the small budget that fits.
    off = choose_budget(QWEN, free, 1024, PLENTY, cap=32768, checkpointing=False)
    assert not off.gradient_checkpointing and off.rows == plain // 1024 == 2
    # Plenty of memory: checkpointing stays off, unless asked for.
    assert not choose_budget(QWEN, H100_FREE, 1024, PLENTY, cap=32768).gradient_checkpointing
    asked = choose_budget(QWEN, H100_FREE, 1024, PLENTY, cap=32768, checkpointing=True)
    assert asked.gradient_checkpointing and asked.reason.endswith("(as asked)") and asked.predicted_peak_gib < 6


def test_a_gpu_too_small_for_one_row_still_gets_one_and_says_so():
    budget = choose_budget(QWEN, 5 * GIB, 2048, PLENTY, cap=32768)
    assert budget.rows == 1 and budget.tokens_per_step == 2048
    assert "may not fit" in budget.reason


def test_a_small_dataset_keeps_at_least_eight_steps_per_epoch():
    budget = choose_budget(QWEN, H100_FREE, 1024, dataset_tokens=20_000, cap=32768)
    assert (budget.rows, budget.limit) == (2, "dataset")  # 20000 / 8 = 2500 tokens: 2 rows of 1024
    assert "8 steps per epoch" in budget.reason
    assert choose_budget(QWEN, H100_FREE, 1024, dataset_tokens=500, cap=32768).rows == 1


def test_the_effective_batch_rule():
    budget = choose_budget(QWEN, H100_FREE, 1024, PLENTY, cap=32768)
    # The request asks 2 x 1024 x 64 = 131072 tokens per optimizer step: 4 device steps of 32768.
    cfg, record = apply_budget(TrainConfig(gradient_accumulation_steps=64, max_steps=10), budget, 1024)
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.max_steps) == (32, 4, 10)
    assert record["tokens_per_optimizer_step"] == record["requested_tokens_per_optimizer_step"] == 131072
    # 3 x 2048 = 6144 requested, not a multiple of the budget: rounded up to one device step.
    cfg, record = apply_budget(TrainConfig(gradient_accumulation_steps=3), budget.__class__(
        **{**budget.as_dict(), "tokens_per_step": 4096, "rows": 4}), 1024)  # fmt: skip
    assert cfg.gradient_accumulation_steps == 2 and record["tokens_per_optimizer_step"] == 8192
    # The default asks 2 x 1024 = 2048 tokens: a step of 32768 is 16 of them, so step counts shrink 16-fold.
    asked = TrainConfig(max_steps=100, save_steps=50, eval_steps=8, learning_rate=1e-4)
    cfg, record = apply_budget(asked, budget, 1024)
    assert (cfg.max_steps, cfg.save_steps, cfg.eval_steps, cfg.gradient_accumulation_steps) == (7, 4, 1, 1)
    assert cfg.learning_rate == 1e-4 and record["step_scale"] == 16
    assert record["rescaled"]["max_steps"] == [100, 7]
    epochs, _ = apply_budget(TrainConfig(num_train_epochs=2), budget, 1024)
    assert epochs.num_train_epochs == 2 and epochs.max_steps is None


def _tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    return LlamaForCausalLM(config)


def _with(settings, **train):
    return settings.model_copy(update={"train": settings.train.model_copy(update=train)})


def test_resolve_steps_chooses_who_decides(settings):
    model = _tiny_model()
    kw = {"device": "cpu", "packing": True, "model": model, "lora": False, "dataset_tokens": PLENTY}
    kw |= {"max_length": 256, "fused_loss": False}
    # CPU without a memory figure keeps today's defaults.
    cfg, record = resolve_steps(settings, TrainConfig(), **kw)
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.gradient_checkpointing) == (
        2,
        1,
        False,
    )
    assert record["mode"] == "fixed" and "no CUDA GPU and no train.budget_memory_gib" in record["reason"]
    # A memory figure applies the auto rule; it sizes the steps from the model's own shape.
    shape = ModelShape.of(model)
    assert (shape.layers, shape.hidden, shape.vocab, shape.weight_bytes) == (2, 32, 1000, 4)
    sized = _with(settings, budget_memory_gib=2.5, max_tokens_per_step=4096)
    cfg, record = resolve_steps(sized, TrainConfig(), **kw)
    assert record["mode"] == "auto" and cfg.per_device_train_batch_size == 16 and record["limit"] == "cap"
    assert record == {**record, **choose_budget(shape, int(2.5 * GIB), 256, PLENTY, 4096, fused_loss=False).as_dict()}
    # An explicit batch wins, and so does a number of tokens; unpacked steps are not sized.
    assert resolve_steps(sized, TrainConfig(per_device_train_batch_size=3), **kw)[0].per_device_train_batch_size == 3
    assert resolve_steps(sized, TrainConfig(tokens_per_step=1024), **kw)[0].per_device_train_batch_size == 4
    assert resolve_steps(sized, TrainConfig(), **{**kw, "packing": False})[0].per_device_train_batch_size == 2
    off = _with(sized, tokens_per_step="off")
    assert resolve_steps(off, TrainConfig(), **kw)[0].per_device_train_batch_size == 2
    assert resolve_steps(off, TrainConfig(tokens_per_step="auto"), **kw)[0].per_device_train_batch_size == 16
    checkpointed, _ = resolve_steps(sized, TrainConfig(gradient_checkpointing=True), **kw)
    assert checkpointed.gradient_checkpointing


def test_a_resumed_task_keeps_the_budget_it_first_chose(settings, tmp_path):
    from service.train import budget as token_budget

    model = _tiny_model()
    kw = {"device": "cpu", "packing": True, "model": model, "lora": False, "dataset_tokens": PLENTY}
    kw |= {"max_length": 256, "fused_loss": False}
    first_cfg, first = resolve_steps(_with(settings, budget_memory_gib=2.5), TrainConfig(max_steps=40), **kw)
    token_budget.save(tmp_path, "task-1", first)
    assert token_budget.load_previous(tmp_path, "task-2") is None  # another task's folder (overwrite): fresh choice
    previous = token_budget.load_previous(tmp_path, "task-1")
    less_memory = _with(settings, budget_memory_gib=2.3)
    assert resolve_steps(less_memory, TrainConfig(max_steps=40), **kw)[0] != first_cfg  # would choose otherwise
    again_cfg, again = resolve_steps(less_memory, TrainConfig(max_steps=40), **kw, previous=previous)
    assert again_cfg == first_cfg and again["rows"] == first["rows"] and again["rescaled"] == first["rescaled"]
    assert again["reason"].endswith("(chosen when the task first started)")
    (tmp_path / token_budget.BUDGET_FILE).write_text("{not json")
    assert token_budget.load_previous(tmp_path, "task-1") is None


def test_bad_budget_requests_are_refused(client):
    client.post("/api/data/upload", files={"file": ("train_sample.json", SAMPLE.read_bytes())})
    base = {"strategy": "trl", "dataset_path": "uploads/train_sample.json"}
    bad = [{"tokens_per_step": 4096, "per_device_train_batch_size": 2}, {"tokens_per_step": 0}]
    bad += [{"tokens_per_step": "lots"}, {"tokens_per_step": 10**9}, {"gradient_checkpointing": "maybe"}]
    for config in bad:
        r = client.post("/api/train/start", json={**base, "config": config})
        assert r.status_code == 422, (config, r.text)
        assert set(r.json()["error"]) == {"type", "message", "details"}


def _bigger_sample(folder):
    """The sample chats 8 times over (~10k tokens): enough that 1/8 of the data does not limit the budget."""
    path = folder / "train_x8.json"
    path.write_text(json.dumps(json.loads(SAMPLE.read_text()) * 8))
    return path


def _auto_settings(settings):
    # 3 GiB of "device memory" on CPU: the auto rule runs, training itself stays a plain CPU run.
    return _with(settings, budget_memory_gib=3.0, packing="on")


def _expected(settings, dataset_tokens: int, lora_rank: int | None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(settings.base_model_path())
    free = int(settings.train.budget_memory_gib * GIB)
    cap = settings.train.max_tokens_per_step
    return choose_budget(ModelShape.of(model), free, 256, dataset_tokens, cap, lora_rank, fused_loss=False)


def test_auto_budget_is_recorded_in_the_task(settings):
    settings = _auto_settings(settings)
    with TestClient(create_app(settings)) as client:
        data = _bigger_sample(settings.model_dir)
        client.post("/api/data/upload", files={"file": (data.name, data.read_bytes())})
        body = {"strategy": "lora", "dataset_path": f"uploads/{data.name}", "output_dir": "outputs/auto"}
        body["config"] = {"max_steps": 2, "lora_config": {"r": 4}, "report_to": "none"}
        task_id = client.post("/api/train/start", json=body).json()["task_id"]
        task = wait_for(client, task_id, {"succeeded", "failed"})
        assert task["status"] == "succeeded", task["error"]
        events = client.get(f"/api/train/logs/{task_id}").json()["items"]
    budget = task["metrics"]["token_budget"]
    expected = _expected(settings, task["metrics"]["data_stats"]["tokens"], lora_rank=4)
    assert budget == {**budget, **expected.as_dict()}
    # tiny-llama in fp32 without a fused loss: ~0.6 MB a token, mostly logits; 3 GiB leave room for 4 rows.
    assert (budget["mode"], budget["limit"], budget["rows"], budget["free_memory_gib"]) == ("auto", "memory", 4, 3.0)
    # The default asks 2 rows x 256 tokens per optimizer step: a step of 4 rows is 2 of them, max_steps 2 -> 1.
    assert budget["step_scale"] == 2 and budget["rescaled"] == {"max_steps": [2, 1]}
    assert task["metrics"]["global_step"] == 1
    recorded = [e for e in events if (e["message"] or "").startswith("token budget: 4 rows x 256 tokens")]
    assert recorded and recorded[0]["type"] == "budget" and recorded[0]["data"] == budget
    out = settings.model_dir / "outputs" / "auto"
    args = json.loads((out / "training_args.json").read_text())
    assert args["token_budget"] == budget
    assert args["sft_config"]["per_device_train_batch_size"] == 4
    assert args["sft_config"]["gradient_checkpointing"] is False
    card = (out / "README.md").read_text()
    assert "| per_device_train_batch_size | 4 |" in card and "| tokens per device step | 1024 (auto:" in card


def _built(settings, tmp_path, config):
    from service.train.runner import build_trainer
    from service.train.service import task_request

    config = {"packing": True, "max_length": 256, "max_steps": 1, "report_to": "none", **config}
    data = _bigger_sample(tmp_path)
    req = TrainRequest.model_validate({"strategy": "trl", "dataset_path": str(data), "config": config})
    request = task_request(req, data, None, settings.base_model_path(), tmp_path / "out")
    return build_trainer(settings, None, "budget-test", request)


def test_packed_examples_match_alone_at_the_auto_budget(settings, tmp_path):
    from service.train.packing import packed_loss_gaps

    settings = _auto_settings(settings)
    built = _built(settings, tmp_path, {})
    assert built.budget["mode"] == "auto" and built.args.per_device_train_batch_size == built.budget["rows"] > 2
    batch = next(iter(built.trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] > 2 * 256  # one row of several rows
    gaps = packed_loss_gaps(built.trainer.model.eval(), batch)
    assert len(gaps) >= 6
    assert max(g["gap"] for g in gaps) <= 1e-4, gaps


def test_an_explicit_batch_wins_over_the_auto_budget(settings, tmp_path):
    settings = _auto_settings(settings)
    built = _built(settings, tmp_path, {"per_device_train_batch_size": 2})
    assert built.args.per_device_train_batch_size == 2 and not built.args.gradient_checkpointing
    assert built.budget["mode"] == "fixed" and "batch size set" in built.budget["reason"]
    built = _built(settings, tmp_path, {"tokens_per_step": 768})
    assert built.args.per_device_train_batch_size == 3 and built.budget["mode"] == "fixed"
