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


def _lora_model(settings, dtype, dropout=0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(settings.base_model_path(), dtype=dtype)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=dropout)
    torch.manual_seed(0)
    model = get_peft_model(base, config)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a fresh adapter is a no-op (B = 0)
            param.data.normal_(0, 0.05)
    torch.manual_seed(1)
    return model, torch.randint(0, base.config.vocab_size, (2, 48))


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worst_error(grads, reference):
    return max(float((grads[n] - ref).norm() / ref.norm()) for n, ref in reference.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lora_matches_peft(settings, dtype):
    """The fused LoRA path gives PEFT's loss and adapter gradients; with a bf16 base its matmuls run in bf16 and
    it lands as close to an fp32 reference as PEFT's own bf16 path does."""
    from service.train.fused_lora import LoraLinearFunction, StackedLoraFunction, fuse_lora_layers

    reference, ids = _lora_model(settings, dtype)
    loss_ref, grads_ref = _loss_and_grads(reference.float(), ids)  # the same weights in fp32
    model, _ = _lora_model(settings, dtype)
    loss_peft, grads_peft = _loss_and_grads(model, ids)
    assert fuse_lora_layers(model) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    calls = []
    originals = {f: f.forward for f in (LoraLinearFunction, StackedLoraFunction)}

    def counting(function):
        def forward(ctx, *args):
            calls.append((function.__name__, args[0].dtype))
            return originals[function](ctx, *args)

        return staticmethod(forward)

    for function in originals:
        function.forward = counting(function)
    try:
        loss_fused, grads_fused = _loss_and_grads(model, ids)
    finally:
        for function, forward in originals.items():
            function.forward = staticmethod(forward)
    # Frozen bias-free layers at least twice as wide in as out (k, v: 64 -> 32; down: 128 -> 64) take the stacked
    # [W; A] GEMM, the others (q, o: 64 -> 64; gate, up: 64 -> 128) the plain one
    stacked = [False, True, True, False, False, False, True]  # q, k, v, o, gate, up, down
    per_layer = [("StackedLoraFunction" if s else "LoraLinearFunction", dtype) for s in stacked]
    assert calls == per_layer * 2
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # fp32 weights
    if dtype == torch.float32:
        assert loss_fused == pytest.approx(loss_ref, rel=1e-6)
        assert _worst_error(grads_fused, grads_ref) < 1e-5
    else:  # bf16 rounding either way: no further from the fp32 reference than PEFT's own path
        assert abs(loss_fused - loss_ref) <= 2 * abs(loss_peft - loss_ref) + 1e-3
        assert _worst_error(grads_fused, grads_ref) <= 2 * _worst_error(grads_peft, grads_ref) + 1e-3


def test_lora_with_dropout_keeps_peft_forward_in_the_compute_dtype(settings):
    """Dropout > 0 is not fused: PEFT's forward runs, its adapter matmuls cast down to bf16 instead of x cast up."""
    from service.train.fused_lora import fuse_lora_layers

    model, ids = _lora_model(settings, torch.bfloat16, dropout=0.1)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    seen: list[torch.dtype] = []
    layer.lora_A["default"].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    model.eval()  # no dropout noise: the two paths must agree
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
        fuse_lora_layers(model)
        after = model(input_ids=ids).logits.float()
    assert seen == [torch.float32, torch.bfloat16]
    assert (after - before).norm() <= 2e-2 * before.norm()


def test_varlen_boundaries_from_position_ids():
    from service.train.attention import boundaries

    ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, longest = boundaries(ids)
    assert cu.tolist() == [0, 3, 5, 9] and cu.dtype == torch.int32 and longest == 4
    assert boundaries(ids)[0] is cu  # every layer of one forward reuses them
    cu, longest = boundaries(torch.tensor([[5, 6, 0, 1, 2]]))  # a row cut inside its first example
    assert cu.tolist() == [0, 2, 5] and longest == 3
