"""Document-masked attention for packed rows through PyTorch's own FlashAttention varlen kernel."""

import functools
import importlib.util
import inspect
from typing import Any

NAME = "varlen"
_last: dict[str, Any] = {}  # the boundaries of the last packed row seen: every layer of a forward shares them


def available() -> bool:
    """Whether this PyTorch has varlen attention and a CUDA GPU to run it on."""
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("torch.nn.attention.varlen") is not None


def register() -> str:
    """Make NAME a valid attn_implementation for transformers models; returns NAME."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    return NAME


def boundaries(position_ids: Any) -> tuple[Any, int]:
    """Cumulative example starts (int32, ending with the row length) and the longest example of a packed row."""
    import torch

    if _last.get("position_ids") is position_ids:
        return _last["cu"], _last["max"]
    flat = position_ids[0]
    starts = flat == 0
    starts[0] = True  # a row always starts an example, even one cut at its front
    cu = torch.cat([starts.nonzero().flatten(), flat.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())  # one host sync per forward, not one per layer
    _last.update(position_ids=position_ids, cu=cu, max=longest)
    return cu, longest


@functools.cache
def _call_options(grouped: bool) -> tuple[tuple[tuple[str, Any], ...], bool, bool]:
    """Causal and grouped-query options for this PyTorch's varlen_attn (its signature changed across releases).

    Returns the keyword arguments, whether key/value heads must be repeated by hand, and whether it takes a scale.
    """
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    options: list[tuple[str, Any]] = [("is_causal", True) if "is_causal" in params else ("window_size", (-1, 0))]
    if grouped and "enable_gqa" in params:
        options.append(("enable_gqa", True))
        grouped = False
    return tuple(options), grouped, "scale" in params


def varlen_attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_ids: Any = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Causal attention within each example of one padding-free packed row ([1, heads, tokens, dim] in)."""
    from torch.nn.attention.varlen import varlen_attn

    if query.shape[0] != 1 or position_ids is None:
        raise ValueError(f"{NAME} attention takes one padding-free packed row with position ids (packing on)")
    if dropout or sliding_window:
        raise ValueError(f"{NAME} attention supports neither attention dropout nor sliding windows")
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # [tokens, heads, dim]
    options, repeat, takes_scale = _call_options(q.shape[1] != k.shape[1])
    kwargs = dict(options)
    if repeat:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if takes_scale:
        kwargs["scale"] = scaling
    elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-6:
        raise ValueError(f"this PyTorch's varlen attention has no scale argument, and the model uses {scaling}")
    cu, longest = boundaries(position_ids)
    out = varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)
    return out.unsqueeze(0), None
