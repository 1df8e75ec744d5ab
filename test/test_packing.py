"""Packing must not change what the model learns: per-example losses of a packed batch equal unpacked ones."""

import pytest
import torch

from conftest import SAMPLE, wait_for
from entity.train import TrainRequest
from service.train.packing import packed_loss_gaps
from service.train.runner import build_trainer
from service.train.service import task_request


def _packed_batch(settings, strategy: str, tmp_path):
    req = TrainRequest.model_validate(
        {
            "strategy": strategy,
            "dataset_path": str(SAMPLE),
            "config": {"packing": True, "per_device_train_batch_size": 2, "max_length": 256, "max_steps": 1},
        }
    )
    request = task_request(req, SAMPLE, None, settings.base_model_path(), tmp_path / "out")
    built = build_trainer(settings, None, "packing-test", request)
    model = built.trainer.model.eval()
    if strategy == "lora":  # a fresh LoRA is a no-op (B = 0): make it change the outputs
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.05)
    return model, next(iter(built.trainer.get_train_dataloader()))


@pytest.mark.parametrize("strategy", ["trl", "lora"])
def test_packed_per_example_losses_equal_one_by_one(settings, strategy, tmp_path):
    model, batch = _packed_batch(settings, strategy, tmp_path)
    gaps = packed_loss_gaps(model, batch)
    assert len(gaps) >= 3, "the packed row should hold several examples"
    assert max(g["gap"] for g in gaps) <= 1e-4, gaps
    # The first label of every example is masked: no example predicts the next one's first token.
    starts = (batch["position_ids"][0] == 0).nonzero().flatten()
    assert all(int(batch["labels"][0, s]) == -100 for s in starts)


def test_the_check_catches_attention_across_examples(settings, tmp_path):
    model, batch = _packed_batch(settings, "trl", tmp_path)
    gaps_ok = packed_loss_gaps(model, batch)
    # Without position ids the packed row is one causal sequence: later examples see earlier ones.
    original_forward = model.forward

    def forward_without_positions(*args, **kwargs):
        kwargs.pop("position_ids", None)
        return original_forward(*args, **kwargs)

    model.forward = forward_without_positions
    try:
        gaps_leaky = packed_loss_gaps(model, batch)
    finally:
        model.forward = original_forward
    assert max(g["gap"] for g in gaps_ok) <= 1e-4
    assert max(g["gap"] for g in gaps_leaky) > 1e-3


def test_packing_default_and_training_through_the_api(client, settings):
    from entity.train import TrainConfig
    from service.train.runner import attention_for, packing_for

    auto = settings.model_copy(update={"train": settings.train.model_copy(update={"packing": "auto"})})
    assert packing_for(auto, TrainConfig(), "cuda") and not packing_for(auto, TrainConfig(), "cpu")
    assert not packing_for(auto, TrainConfig(packing=False), "cuda")
    on = settings.model_copy(update={"train": settings.train.model_copy(update={"packing": "on"})})
    assert packing_for(on, TrainConfig(), "cpu")
    assert attention_for(TrainConfig(), True, "cuda") == "flex_attention"
    assert attention_for(TrainConfig(), True, "cpu") is None
    assert attention_for(TrainConfig(attn_implementation="eager"), True, "cuda") == "eager"

    client.post("/api/data/upload", files={"file": ("train_sample.json", SAMPLE.read_bytes())})
    body = {
        "strategy": "lora",
        "dataset_path": "uploads/train_sample.json",
        "config": {"packing": True, "max_steps": 2, "per_device_train_batch_size": 2, "max_length": 256},
    }
    task_id = client.post("/api/train/start", json=body).json()["task_id"]

    task = wait_for(client, task_id, {"succeeded", "failed"})
    assert task["status"] == "succeeded", task["error"]
    events = client.get(f"/api/train/logs/{task_id}").json()["items"]
    assert any("packing on" in (e["message"] or "") for e in events)
    liger = client.post("/api/train/start", json={**body, "config": {**body["config"], "use_liger_kernel": True}})
    assert liger.status_code == 422 and "liger" in liger.json()["error"]["message"]


def test_lora_inputs_skip_the_fp32_cast_with_the_same_result(settings):
    """Under bf16 autocast, LoRA layers fed their bf16 input directly give PEFT's own loss and gradients."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from service.train.runner import skip_adapter_input_casts

    base = AutoModelForCausalLM.from_pretrained(settings.base_model_path(), dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    ids = torch.randint(0, base.config.vocab_size, (2, 48))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        return float(loss), grads

    loss_cast, grads_cast = loss_and_grads()
    assert skip_adapter_input_casts(model) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    loss_direct, grads_direct = loss_and_grads()
    with pytest.raises(RuntimeError):  # outside autocast the bf16 input now meets the fp32 adapter directly
        model(input_ids=ids)
    assert loss_direct == pytest.approx(loss_cast, abs=1e-6)
    for name, grad in grads_cast.items():
        torch.testing.assert_close(grads_direct[name], grad, rtol=0, atol=1e-6, msg=name)
