"""LoRA linear layers in one autograd step: no dropout, scaling or add passes over the layer's input or output.

PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as separate ops: with all-linear LoRA at long
packed rows, the dropout, the multiply, the add and autograd's sum of the two input gradients are each a full
pass over a [tokens, features] tensor, more memory time than the adapter matmuls themselves. Here the rank-r
adapter product is written first and the base GEMM accumulates onto it (beta = 1: its epilogue reads it while the
GEMM is compute-bound), for the output and likewise for the input gradient: two memory passes fewer per layer
than adding the product after the base GEMM (a read and a write of the whole output). The fp32 adapter weights are
cast to the activations' dtype (with the scaling folded into B) once per optimizer step, not once per call; the
optimizer still updates the fp32 weights. Frozen bias-free layers at least twice as wide in as out (the MLP's down
projection; k and v of grouped-query models without biases) go further: their weight lives in the first rows of a
[W; A] buffer, so one GEMM reads x once for the output and x A^T, and the input gradient is one GEMM over
[g | s g B] (StackedLoraFunction; their output is a strided view of that GEMM's result). Layers this does not cover
(dropout > 0, DoRA and other variants, several active adapters, biased adapters) keep PEFT's forward, with only the
adapter weights cast down instead of the input cast up.
"""

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

_STEPS = [0]  # optimizer steps taken in this process: fused optimizers update weights without a version bump
_HOOKED: list[Any] = []
_CUDA_OUT_DTYPE: list[bool | None] = [None]  # whether torch.mm takes out_dtype on CUDA here (None: not tried yet)


def _fp32_mm(left: Any, right: Any) -> Any:
    """The product of two matrices in fp32: one GEMM writing fp32 on CUDA where this PyTorch can, else mm and cast."""
    if left.is_cuda and left.dtype != torch.float32 and _CUDA_OUT_DTYPE[0] is not False:
        try:
            out = torch.mm(left, right, out_dtype=torch.float32)
            _CUDA_OUT_DTYPE[0] = True
            return out
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError):  # an older PyTorch: no mm.dtype
            _CUDA_OUT_DTYPE[0] = False
    return (left @ right).float()


def _count_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    """Optimizer step post-hook: every cached adapter cast is stale after it."""
    _STEPS[0] += 1


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + scaling (x A^T) B^T, with the backward written out to reuse each GEMM's output."""

    @staticmethod
    def forward(
        ctx: Any, x: Any, weight: Any, bias: Any, lora_a: Any, lora_b: Any, a_w: Any, sb_w: Any, scaling: float
    ) -> Any:
        """The adapter product (and bias) first, the base GEMM added onto it; a_w and sb_w are A and s B cast."""
        flat = x.reshape(-1, x.shape[-1])
        a = flat @ a_w.t()
        y = a @ sb_w.t() if bias is None else torch.addmm(bias, a, sb_w.t())
        y.addmm_(flat, weight.t())
        ctx.save_for_backward(flat, a, weight, a_w, sb_w)
        ctx.scaling, ctx.x_shape, ctx.has_bias = scaling, x.shape, bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_y: Any) -> tuple[Any, ...]:
        """Gradients of x, W and b (when they need them) and of the fp32 adapter weights."""
        flat, a, weight, a_w, sb_w = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        grad_a = g @ sb_w  # scaling g B: [tokens, r], small
        grad_x = grad_w = grad_bias = None
        if ctx.needs_input_grad[0]:  # the adapter's part first, the base GEMM accumulating onto it
            grad_x = (grad_a @ a_w).addmm_(g, weight).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = g.t() @ flat
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        grad_lora_a = _fp32_mm(grad_a.t(), flat) if ctx.needs_input_grad[3] else None
        grad_lora_b = _fp32_mm(g.t(), a).mul_(ctx.scaling) if ctx.needs_input_grad[4] else None
        return grad_x, grad_w, grad_bias, grad_lora_a, grad_lora_b, None, None, None


class StackedLoraFunction(torch.autograd.Function):
    """LoraLinearFunction for a frozen, bias-free layer whose weight W is the first rows of stacked = [W; A]."""

    @staticmethod
    def forward(ctx: Any, x: Any, lora_a: Any, lora_b: Any, stacked: Any, sb_w: Any, scaling: float) -> Any:
        """[x W^T | x A^T] in one GEMM, then the adapter product added onto the first part (a strided view)."""
        flat = x.reshape(-1, x.shape[-1])
        n = stacked.shape[0] - lora_a.shape[0]
        out = flat @ stacked.t()
        a = out[:, n:].clone()  # small: saved apart from the output, which later ops may hold or replace
        y = out[:, :n].addmm_(a, sb_w.t())
        ctx.save_for_backward(flat, a, stacked, sb_w)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx: Any, grad_y: Any) -> tuple[Any, ...]:
        """The input gradient as [g | s g B] @ [W; A] in one GEMM; the adapter gradients as LoraLinearFunction's."""
        flat, a, stacked, sb_w = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        n = g.shape[1]
        grad_x = None
        if ctx.needs_input_grad[0]:
            both = g.new_empty(g.shape[0], stacked.shape[0])
            both[:, :n].copy_(g)
            grad_a = torch.mm(g, sb_w, out=both[:, n:])
            grad_x = (both @ stacked).view(ctx.x_shape)
        else:
            grad_a = g @ sb_w
        grad_lora_a = _fp32_mm(grad_a.t(), flat) if ctx.needs_input_grad[1] else None
        grad_lora_b = _fp32_mm(g.t(), a).mul_(ctx.scaling) if ctx.needs_input_grad[2] else None
        return grad_x, grad_lora_a, grad_lora_b, None, None, None


def _stack(layer: Any, name: str) -> None:
    """Move a frozen, bias-free, much-wider-in-than-out base weight into the first rows of a [W; A] buffer."""
    base, a = layer.get_base_layer(), layer.lora_A[name].weight
    w = base.weight
    n, k = w.shape
    if w.requires_grad or base.bias is not None or k < 2 * n or not w.is_contiguous() or a.shape[1] != k:
        return
    stacked = w.new_empty(n + a.shape[0], k)
    with torch.no_grad():
        stacked[:n].copy_(w)
    w.data = stacked[:n]
    layer._lora_stacked = (name, stacked)


def _stacked_for(layer: Any, name: str, x: Any) -> Any:
    """The layer's [W; A] buffer with A's rows current, or None where the stacked path does not apply now."""
    held = layer.__dict__.get("_lora_stacked")
    if held is None or held[0] != name:
        return None
    stacked, w, a = held[1], layer.get_base_layer().weight, layer.lora_A[name].weight
    if w.data_ptr() != stacked.data_ptr() or w.requires_grad or stacked.dtype != x.dtype or a.shape[1] != w.shape[1]:
        return None  # the weight was moved, cast or unfrozen since: the plain fused path
    stamp = (_STEPS[0], a._version, a.data_ptr())
    if layer._lora_casts.get("stacked") != stamp:
        with torch.no_grad():
            stacked[w.shape[0] :].copy_(a)
        layer._lora_casts["stacked"] = stamp
    return stacked


def _cast(layer: Any, key: str, weight: Any, dtype: Any, scale: float = 1.0) -> Any:
    """The weight times scale in dtype, without autograd, cached until the weight may change (a step, a load)."""
    stamp = (_STEPS[0], weight._version, weight.data_ptr(), dtype, scale)
    hit = layer._lora_casts.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    with torch.no_grad():
        value = (weight * scale if scale != 1.0 else weight).to(dtype)
        if value is weight:  # same dtype, no scale: a detached alias, so autograd sees a constant
            value = weight.detach()
    layer._lora_casts[key] = (stamp, value)
    return value


def _single_vanilla_adapter(layer: Any) -> str | None:
    """The one active adapter of a plain LoRA Linear this function covers, else None (cached per adapter state)."""
    state = (layer.disable_adapters, bool(layer.merged_adapters), tuple(layer.active_adapters))
    hit = layer.__dict__.get("_lora_plan")
    if hit is not None and hit[0] == state:
        return hit[1]
    name = None
    if not state[0] and not state[1] and len(state[2]) == 1:
        name = state[2][0]
        if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
            name = None
        else:
            a, b, base = layer.lora_A[name], layer.lora_B[name], layer.get_base_layer()
            plain = all(type(m) is torch.nn.Linear for m in (a, b, base)) and a.bias is None and b.bias is None
            name = name if plain and isinstance(layer.lora_dropout[name], torch.nn.Identity) else None
    layer.__dict__["_lora_plan"] = (state, name)
    return name


def _fused_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """LoRA Linear forward through LoraLinearFunction, or PEFT's own forward where it does not apply."""
    name = None if args or kwargs else _single_vanilla_adapter(self)
    if name is None:
        return self._peft_forward(x, *args, **kwargs)
    base = self.get_base_layer()
    a, b, scaling = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
    sb_w = _cast(self, "b", b, x.dtype, scaling)
    stacked = _stacked_for(self, name, x)
    if stacked is not None:
        return StackedLoraFunction.apply(x, a, b, stacked, sb_w, scaling)
    return LoraLinearFunction.apply(x, base.weight, base.bias, a, b, _cast(self, "a", a, x.dtype), sb_w, scaling)


def _linear_in_input_dtype(self: Any, x: Any) -> Any:
    """nn.Linear.forward with the weight (and bias) cast to the input's dtype."""
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return F.linear(x, self.weight.to(x.dtype), bias)


def fuse_lora_layers(model: Any) -> int:
    """Route every PEFT LoRA Linear of the model through the fused path; returns how many layers were changed."""
    from peft.tuners.lora import Linear as LoraLinear

    if not _HOOKED:
        _HOOKED.append(register_optimizer_step_post_hook(_count_step))
    layers = [m for m in model.modules() if isinstance(m, LoraLinear) and not hasattr(m, "_peft_forward")]
    for layer in layers:
        layer._peft_forward = layer.forward
        layer._lora_casts = {}
        layer.forward = types.MethodType(_fused_forward, layer)
        # The fallback (PEFT's forward) casts the whole input to the fp32 adapter dtype: cast the adapter down.
        layer.cast_input_dtype_enabled = False
        name = _single_vanilla_adapter(layer)
        if name is not None:
            _stack(layer, name)
        for adapter in (*layer.lora_A.values(), *layer.lora_B.values()):
            if type(adapter) is torch.nn.Linear:
                adapter.forward = types.MethodType(_linear_in_input_dtype, adapter)
    return len(layers)
