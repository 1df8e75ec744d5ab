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
    assert attention_for(TrainConfig(), True, "cuda") == "flex_attention"  # no varlen kernel without CUDA
    with pytest.raises(ValueError, match="varlen"):
        attention_for(TrainConfig(attn_implementation="varlen"), True, "cpu")
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
    varlen_config = {**body["config"], "attn_implementation": "varlen"}
    varlen = client.post("/api/train/start", json={**body, "config": varlen_config})
    assert varlen.status_code == 422 and "varlen" in varlen.json()["error"]["message"]


def test_lora_matmuls_run_in_the_input_dtype_with_fp32_weights(settings):
    """With a bf16 base, the adapter matmuls run in bf16 while the trained weights stay fp32; same loss and grads."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from service.train.runner import adapters_in_compute_dtype

    base = AutoModelForCausalLM.from_pretrained(settings.base_model_path(), dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    ids = torch.randint(0, base.config.vocab_size, (2, 48))
    seen: list[torch.dtype] = []
    hook = (
        model.base_model.model.model.layers[0]
        .self_attn.q_proj.lora_A["default"]
        .register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    )

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        return float(loss), grads

    loss_peft, grads_peft = loss_and_grads()
    assert adapters_in_compute_dtype(model) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    loss_ours, grads_ours = loss_and_grads()
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]  # PEFT's own path runs the adapter in fp32, ours in bf16
    trained = [p for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in trained)
    assert loss_ours == pytest.approx(loss_peft, rel=1e-2)
    for name, grad in grads_peft.items():  # bf16 rounding of the adapter path: close, not equal
        assert (grads_ours[name] - grad).norm() <= 0.05 * grad.norm() + 1e-6, name


def test_varlen_boundaries_from_position_ids():
    from service.train.attention import boundaries

    ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, longest = boundaries(ids)
    assert cu.tolist() == [0, 3, 5, 9] and cu.dtype == torch.int32 and longest == 4
    assert boundaries(ids)[0] is cu  # every layer of one forward reuses them
    cu, longest = boundaries(torch.tensor([[5, 6, 0, 1, 2]]))  # a row cut inside its first example
    assert cu.tolist() == [0, 2, 5] and longest == 3
