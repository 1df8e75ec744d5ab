"""Paged attention for the engine through PyTorch's own FlashAttention varlen kernel (no flash-attn package needed).

Without flash-attn, transformers' continuous batching runs SDPA over the gathered KV cache with a dense mask padded
to the step's token budget and the graph's KV bucket (an 8k x 8k mask per layer per step). This module registers an
attention function that the library treats as a flash implementation (its name contains "flash", so no mask is built
and no mask memory is reserved) and that computes, per request of the packed step, causal attention of its new
tokens over its cached + new keys with `torch.ops.aten._flash_attention_forward` on `cu_seq_lens_q/k`: no mask, no
work over padding. The name carries no version digit, so the library keeps its block-table decode path (which needs
flash-attn's `flash_attn_with_kvcache`) off and every step takes the varlen path.

Both lengths given to the kernel are taken from the step's (padded, static) tensor shapes, never from the batch's
contents, so one captured CUDA graph serves every batch of its bucket. On CPU (tests) the same function runs a
per-request SDPA loop instead of the CUDA kernel: slow, but the same arithmetic path through the paged cache.
"""

from typing import Any

import torch

NAME = "torch_flash_varlen"  # "flash" makes the library skip masks; no "2"/"3" keeps its flash_attn-only paths off


def available(device: torch.device | str) -> bool:
    """Whether the fast kernel exists for `device` (PyTorch's built-in flash attention needs CUDA)."""
    return torch.device(device).type == "cuda" and hasattr(torch.ops.aten, "_flash_attention_forward")


def full_attention_only(config: Any) -> bool:
    """Whether every layer of the model is plain causal attention (no sliding window, which this function lacks)."""
    from transformers.generation.continuous_batching.cache import group_layers_by_attn_type

    return list(group_layers_by_attn_type(config.get_text_config())) == ["full_attention"]


def register() -> str:
    """Make NAME a valid attn_implementation for transformers models; returns NAME."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, paged_varlen_attention_forward)
    return NAME


def varlen_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, scale: float
) -> torch.Tensor:
    """Per-sequence causal attention (bottom-right aligned, as flash's varlen kernel): [tokens, heads, dim] in/out."""
    out = torch.zeros_like(q)
    groups = q.shape[1] // k.shape[1]
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    for i in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[i], starts_q[i + 1], starts_k[i], starts_k[i + 1]
        if q1 <= q0:
            continue
        qi = q[q0:q1].transpose(0, 1)  # [heads, q, dim]
        ki, vi = (t[k0:k1].repeat_interleave(groups, dim=1).transpose(0, 1) for t in (k, v))
        nq, nk = q1 - q0, k1 - k0
        keep = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(diagonal=nk - nq)
        out[q0:q1] = torch.nn.functional.scaled_dot_product_attention(
            qi, ki, vi, attn_mask=keep, scale=scale
        ).transpose(0, 1)
    return out


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of packed sequences ([tokens, heads, dim]; GQA allowed), lengths from cu_q / cu_k (int32).

    The maximum lengths given to the kernel are the packed totals (static per CUDA graph, always >= any sequence);
    the query one is at least 2 so that FlashAttention never takes its single-query GQA reshape, which assumes every
    sequence has exactly one query (padding sequences here have none).
    """
    if q.device.type != "cuda":
        return varlen_reference(q, k, v, cu_q, cu_k, scale)
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max(2, q.shape[0]), max(1, k.shape[0]), 0.0, True, False, scale=scale
    )
    return out[0]


def paged_varlen_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    cache: Any = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of one packed continuous-batching step ([1, heads, tokens, dim] in, [1, tokens, heads, dim] out).

    Outside the engine (no paged cache given), the call goes to transformers' SDPA function unchanged.
    """
    if cache is None or cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if sliding_window or dropout:
        raise ValueError(f"{NAME} attention supports neither sliding windows nor attention dropout")
    # The cache writes this step's keys/values and gathers each request's whole range (past + new), in batch order.
    update = {
        "cu_seq_lens_k": cu_seq_lens_k,
        "max_length_k": kwargs.get("max_length_k"),
        "read_index": kwargs["read_index"],
        "write_index": kwargs["write_index"],
        "block_table": None,
    }
    key, value = cache.update(key, value, module.layer_idx, update)
    q = query[0].transpose(0, 1).contiguous()  # [tokens, heads, dim]
    k, v = (t[0].transpose(0, 1).contiguous() for t in (key, value))
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = varlen_attention(q, k, v, cu_seq_lens_q.to(torch.int32), update["cu_seq_lens_k"], scale)
    return out.unsqueeze(0), None
