"""LoRA linear layers in one autograd step: no dropout, scaling or add passes over the layer's input or output.

PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as separate ops: with all-linear LoRA at long
packed rows, the dropout, the multiply, the add and autograd's sum of the two input gradients are each a full
pass over a [tokens, features] tensor, more memory time than the adapter matmuls themselves. Here the adapter
product is added inside the output GEMM (addmm with alpha=scaling) and the input gradient likewise, with the fp32
adapter weights cast to the activations' dtype (the optimizer still updates fp32 weights). Layers this does not
cover (dropout > 0, DoRA and other variants, several active adapters, biased adapters) keep PEFT's forward, with
only the adapter weights cast down instead of the input cast up.
"""

import types
from typing import Any

import torch
import torch.nn.functional as F


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + scaling (x A^T) B^T, with the backward written out to reuse each GEMM's output."""

    @staticmethod
    def forward(ctx: Any, x: Any, weight: Any, bias: Any, lora_a: Any, lora_b: Any, scaling: float) -> Any:
        """Two GEMMs and one addmm; saves x, the rank-r activation and the weights."""
        a_w, b_w = lora_a.to(x.dtype), lora_b.to(x.dtype)
        flat = x.reshape(-1, x.shape[-1])
        a = flat @ a_w.t()
        y = F.linear(flat, weight, bias).addmm_(a, b_w.t(), alpha=scaling)
        ctx.save_for_backward(flat, a, weight, a_w, b_w)
        ctx.scaling, ctx.x_shape, ctx.has_bias = scaling, x.shape, bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_y: Any) -> tuple[Any, ...]:
        """Gradients of x, W and b (when they need them) and of the fp32 adapter weights."""
        flat, a, weight, a_w, b_w = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        grad_a = (g @ b_w).mul_(ctx.scaling)  # [tokens, r]: small
        grad_x = grad_w = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(grad_a, a_w).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = g.t() @ flat
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        grad_lora_a = (grad_a.t() @ flat).float() if ctx.needs_input_grad[3] else None
        grad_lora_b = (g.t() @ a).mul_(ctx.scaling).float() if ctx.needs_input_grad[4] else None
        return grad_x, grad_w, grad_bias, grad_lora_a, grad_lora_b, None


def _single_vanilla_adapter(layer: Any) -> str | None:
    """The one active adapter of a plain LoRA Linear this function covers, else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    a, b, base = layer.lora_A[name], layer.lora_B[name], layer.get_base_layer()
    plain = all(type(m) is torch.nn.Linear for m in (a, b, base)) and a.bias is None and b.bias is None
    return name if plain and isinstance(layer.lora_dropout[name], torch.nn.Identity) else None


def _fused_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """LoRA Linear forward through LoraLinearFunction, or PEFT's own forward where it does not apply."""
    name = None if args or kwargs else _single_vanilla_adapter(self)
    if name is None:
        return self._peft_forward(x, *args, **kwargs)
    base = self.get_base_layer()
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    return LoraLinearFunction.apply(x, base.weight, base.bias, a, b, self.scaling[name])


def _linear_in_input_dtype(self: Any, x: Any) -> Any:
    """nn.Linear.forward with the weight (and bias) cast to the input's dtype."""
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return F.linear(x, self.weight.to(x.dtype), bias)


def fuse_lora_layers(model: Any) -> int:
    """Route every PEFT LoRA Linear of the model through the fused path; returns how many layers were changed."""
    from peft.tuners.lora import Linear as LoraLinear

    layers = [m for m in model.modules() if isinstance(m, LoraLinear) and not hasattr(m, "_peft_forward")]
    for layer in layers:
        layer._peft_forward = layer.forward
        layer.forward = types.MethodType(_fused_forward, layer)
        # The fallback (PEFT's forward) casts the whole input to the fp32 adapter dtype: cast the adapter down.
        layer.cast_input_dtype_enabled = False
        for adapter in (*layer.lora_A.values(), *layer.lora_B.values()):
            if type(adapter) is torch.nn.Linear:
                adapter.forward = types.MethodType(_linear_in_input_dtype, adapter)
    return len(layers)
