"""The fused LoRA paths and the native RMSNorm against PEFT's and the model's own math (fp32, CPU)."""

import types

import pytest
import torch


class _Two(torch.nn.Module):
    """A biased square layer (the plain fused path) and a bias-free layer 3x wider in than out (the stacked one)."""

    def __init__(self) -> None:
        super().__init__()
        self.square = torch.nn.Linear(24, 24, bias=True)
        self.wide = torch.nn.Linear(24, 8, bias=False)

    def forward(self, x):
        return self.wide(self.square(x))


def _peft_pair(dtype=torch.float32):
    from peft import LoraConfig, get_peft_model

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = get_peft_model(_Two().to(dtype), LoraConfig(r=4, lora_alpha=12, target_modules=["square", "wide"]))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.3)
        models.append(model)
    return models


def _run(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def test_plain_and_stacked_paths_match_peft_forward_and_backward():
    from service.train.fused_lora import LoraLinearFunction, StackedLoraFunction, fuse_lora_layers

    reference, model = _peft_pair()
    assert fuse_lora_layers(model) == 2
    wide = model.base_model.model.wide
    assert wide.base_layer.weight.data_ptr() == wide._lora_stacked[1].data_ptr()  # W is the buffer's first rows
    assert "_lora_stacked" not in model.base_model.model.square.__dict__  # biased and square: the plain path
    used = []
    for function in (LoraLinearFunction, StackedLoraFunction):
        function.forward_original = function.forward
    try:
        for function in (LoraLinearFunction, StackedLoraFunction):
            original = function.forward_original
            function.forward = staticmethod(lambda ctx, *a, _f=function, _o=original: used.append(_f) or _o(ctx, *a))
        x = torch.randn(2, 5, 24)
        out_ref, gx_ref, grads_ref = _run(reference, x)
        out, gx, grads = _run(model, x)
    finally:
        for function in (LoraLinearFunction, StackedLoraFunction):
            function.forward = staticmethod(function.forward_original)
            del function.forward_original
    assert used == [LoraLinearFunction, StackedLoraFunction]
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and len(grads) == 4  # A and B of both layers; the bases are frozen
    for name, ref in grads_ref.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-6)
    # An input that needs no gradient: only the adapter weights get one, the same ones
    model.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    model(x).sum().backward()
    reference(x).sum().backward()
    for name, param in reference.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, param.grad, rtol=1e-5, atol=1e-6)


def test_a_moved_or_cast_base_weight_leaves_the_stacked_path():
    from service.train.fused_lora import fuse_lora_layers

    reference, model = _peft_pair()
    fuse_lora_layers(model)
    model.double()  # new weight tensors: the [W; A] buffer no longer holds W
    reference.double()
    x = torch.randn(3, 24, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(x))


def test_cached_adapter_casts_follow_every_optimizer_step():
    """A fused AdamW step updates the fp32 adapter weights in place without a version bump: the bf16 casts and the
    stacked buffer's A rows are refreshed after each step all the same."""
    from service.train.fused_lora import fuse_lora_layers

    _, model = _peft_pair()
    model.base_model.model.to(torch.bfloat16)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()  # fp32 master weights, as PEFT keeps them over a bf16 base
    fuse_lora_layers(model)
    square, wide = model.base_model.model.square, model.base_model.model.wide
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    stale = model(x).detach()
    for _ in range(3):
        model(x).float().sum().backward()
        a = wide.lora_A["default"].weight
        version = a._version
        optimizer.step()
        optimizer.zero_grad()
        assert a._version == version  # the optimizer leaves no trace a cache could key on
        out = model(x)
        assert torch.equal(square._lora_casts["a"][1], square.lora_A["default"].weight.to(torch.bfloat16))
        assert torch.equal(square._lora_casts["b"][1], (square.lora_B["default"].weight * 3).to(torch.bfloat16))
        assert torch.equal(wide._lora_stacked[1][8:], a.to(torch.bfloat16))
        with torch.no_grad():  # PEFT's own forward on the current weights, adapters cast down
            h = square._peft_forward(x)
            expected = wide._peft_forward(h)
        assert float((out - expected).float().norm() / expected.float().norm()) < 1e-2  # bf16 rounding only
        assert float((out - stale).float().norm() / expected.float().norm()) > 5e-2  # the step changed the output
        stale = out.detach()


def test_native_rms_norm_matches_the_model_norm(settings):
    from transformers import AutoModelForCausalLM

    from service.train.norms import use_native_rms_norm

    model = AutoModelForCausalLM.from_pretrained(settings.base_model_path(), dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_ref, grads_ref = loss_and_grads()
    args = types.SimpleNamespace(use_liger_kernel=True, liger_kernel_config={"swiglu": True})
    assert use_native_rms_norm(model, args) == 2 * 2 + 1  # two per decoder layer and the final norm
    assert args.liger_kernel_config == {"swiglu": True, "rms_norm": False}  # Liger leaves the norms alone
    assert use_native_rms_norm(model) == 0  # once only
    loss, grads = loss_and_grads()
    assert loss == pytest.approx(loss_ref, rel=1e-6)
    for name, ref in grads_ref.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6)


def test_native_rms_norm_takes_liger_norms_without_offset_only():
    from service.train.norms import use_native_rms_norm

    class LigerRMSNorm(torch.nn.Module):  # the shape of Liger's class, which Liger may put in the model's place
        def __init__(self, offset: float) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(8) + 0.5)
            self.variance_epsilon, self.offset = 1e-6, offset

        def forward(self, x):
            x32 = x.float()
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return normed * (self.offset + self.weight)

    model = torch.nn.ModuleList([LigerRMSNorm(0.0), LigerRMSNorm(1.0)])
    x = torch.randn(3, 8)
    before = [m(x) for m in model]
    assert use_native_rms_norm(model) == 1  # the Gemma form (1 + weight) keeps its own forward
    assert "_norm_forward_before" in model[0].__dict__ and "_norm_forward_before" not in model[1].__dict__
    for module, expected in zip(model, before, strict=True):
        torch.testing.assert_close(module(x), expected)
