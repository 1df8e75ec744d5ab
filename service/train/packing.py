"""Checks that packing is exact: each example's loss in a packed row equals its loss run alone."""

import itertools
from typing import Any


def token_nll(model: Any, input_ids: Any, labels: Any, **extra: Any) -> tuple[Any, Any]:
    """Next-token NLL per position (labels shifted as the trainer's loss shifts them) and which positions count."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(input_ids=input_ids, **extra).logits.float()
    targets = labels[:, 1:]
    flat = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1).clamp_min(0), reduction="none"
    )
    return flat.view(targets.shape), targets != -100


def packed_loss_gaps(model: Any, batch: dict[str, Any], alone_attention: str | None = None) -> list[dict[str, float]]:
    """For each example of a padding-free packed batch: its mean loss packed and alone, and the gap.

    alone_attention runs the examples alone through another attention kernel (a reference such as sdpa), so a
    kernel that got both the packed and the alone case wrong the same way still shows a gap.
    """
    ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    if ids.shape[0] != 1:
        raise ValueError("expected one flattened padding-free row")
    starts = [*(positions[0] == 0).nonzero().flatten().tolist(), ids.shape[1]]
    packed_nll, packed_mask = token_nll(model, ids, labels, position_ids=positions)
    packed_attention = model.config._attn_implementation
    model.config._attn_implementation = alone_attention or packed_attention
    try:
        alone_runs = [token_nll(model, ids[:, b:e], labels[:, b:e]) for b, e in itertools.pairwise(starts)]
    finally:
        model.config._attn_implementation = packed_attention
    gaps = []
    for (begin, end), (alone_nll, alone_mask) in zip(itertools.pairwise(starts), alone_runs, strict=True):
        part_nll, part_mask = packed_nll[:, begin : end - 1], packed_mask[:, begin : end - 1]
        if not bool((part_mask == alone_mask).all()) or int(alone_mask.sum()) == 0:
            raise ValueError(f"the labels of the example at {begin}:{end} differ when packed")
        packed = float((part_nll * part_mask).sum() / part_mask.sum())
        alone = float((alone_nll * alone_mask).sum() / alone_mask.sum())
        gaps.append({"tokens": end - begin, "packed": packed, "alone": alone, "gap": abs(packed - alone)})
    return gaps
