"""Tinker's built-in losses on per-token target logprobs (one datum at a time, summed, as Tinker defines them).

Each loss takes the datum's target logprobs (N,) with their graph, its `loss_fn_inputs` as fp32 tensors (N,)
and the request's `loss_fn_config`, and returns the per-token loss (N,) whose sum is the datum's loss.
The formulas follow Tinker's loss documentation (`loss = -objective.sum()`).
"""

from collections.abc import Callable, Mapping

import torch

Inputs = Mapping[str, torch.Tensor]
Config = Mapping[str, float | str]

DEFAULT_CLIP_LOW = 0.8  # Tinker's 1 - epsilon_low with epsilon 0.2
DEFAULT_CLIP_HIGH = 1.2
DEFAULT_DRO_BETA = 0.05


class LossInputError(ValueError):
    """A loss's inputs or config cannot be used."""


def _threshold(inputs: Inputs, config: Config, key: str, default: float) -> torch.Tensor | float:
    """A clip threshold from the datum's inputs (per token), else the config, else the default."""
    if key in inputs:
        return inputs[key]
    value = config.get(key, default)
    if isinstance(value, str):
        raise LossInputError(f"loss_fn_config['{key}'] must be a number, got '{value}'")
    return float(value)


def _clamp(x: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor | float) -> torch.Tensor:
    """Clamp to [low, high], bounds scalar or per token."""
    if isinstance(low, float) and isinstance(high, float):
        return x.clamp(low, high)
    low_t = torch.as_tensor(low, dtype=x.dtype, device=x.device)
    high_t = torch.as_tensor(high, dtype=x.dtype, device=x.device)
    return torch.minimum(torch.maximum(x, low_t), high_t)


def cross_entropy(logp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """-(target_logprobs * weights); weights default to 1."""
    weights = inputs.get("weights")
    return -(logp * weights) if weights is not None else -logp


def importance_sampling(logp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """-(exp(target_logprobs - sampling_logprobs) * advantages)."""
    return -(torch.exp(logp - inputs["logprobs"]) * inputs["advantages"])


def ppo(logp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """-min(ratio * A, clip(ratio, low, high) * A), token-wise."""
    ratio = torch.exp(logp - inputs["logprobs"])
    low = _threshold(inputs, config, "clip_low_threshold", DEFAULT_CLIP_LOW)
    high = _threshold(inputs, config, "clip_high_threshold", DEFAULT_CLIP_HIGH)
    adv = inputs["advantages"]
    return -torch.minimum(ratio * adv, _clamp(ratio, low, high) * adv)


def cispo(logp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """-(sg(clip(ratio, low, high)) * target_logprobs * A)."""
    ratio = torch.exp(logp - inputs["logprobs"])
    low = _threshold(inputs, config, "clip_low_threshold", DEFAULT_CLIP_LOW)
    high = _threshold(inputs, config, "clip_high_threshold", DEFAULT_CLIP_HIGH)
    return -(_clamp(ratio, low, high).detach() * logp * inputs["advantages"])


def dro(logp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """-(target_logprobs * A - beta / 2 * (target_logprobs - sampling_logprobs)^2)."""
    beta = config.get("beta", DEFAULT_DRO_BETA)
    if isinstance(beta, str):
        raise LossInputError(f"loss_fn_config['beta'] must be a number, got '{beta}'")
    return -(logp * inputs["advantages"] - 0.5 * float(beta) * (logp - inputs["logprobs"]) ** 2)


def gspo(logp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """GSPO-token: -mask * min(w * A, clip(w, low, high) * A) with w = sg(s) * p / sg(p).

    s is the length-normalised sequence ratio over `sequence_ratio_mask` (default: every token).
    """
    mask = inputs.get("sequence_ratio_mask")
    if mask is None:
        mask = torch.ones_like(logp)
    count = mask.sum()
    if float(count) <= 0:
        raise LossInputError("sequence_ratio_mask selects no token")
    log_s = (mask * (logp - inputs["logprobs"])).sum() / count
    w = torch.exp(log_s.detach() + logp - logp.detach())
    low = _threshold(inputs, config, "clip_low_threshold", DEFAULT_CLIP_LOW)
    high = _threshold(inputs, config, "clip_high_threshold", DEFAULT_CLIP_HIGH)
    adv = inputs["advantages"]
    return -mask * torch.minimum(w * adv, _clamp(w, low, high) * adv)


LossFn = Callable[[torch.Tensor, Inputs, Config], torch.Tensor]

LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "gspo": gspo,
}

REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
    "gspo": ("target_tokens", "logprobs", "advantages"),
}

UNSUPPORTED: dict[str, str] = {
    # Tinker documents what stable_reinforce needs (sampling with record_stability_info, provenance spans naming
    # each sequence_id) but not its objective, which reads the hosted sampler's stability records: with no
    # published formula there is nothing to implement faithfully.
    "stable_reinforce": (
        "Tinker has not published the stable_reinforce objective (it reads stability records that its hosted "
        "sampler captures with record_stability_info), so this server cannot reproduce it; use "
        "importance_sampling, ppo, cispo or gspo"
    ),
    "custom": "server-side custom losses are not supported; use forward_backward_custom (it runs client-side)",
}

KNOWN_INPUTS = {
    "target_tokens",
    "weights",
    "logprobs",
    "advantages",
    "clip_low_threshold",
    "clip_high_threshold",
    "sequence_ratio_mask",
}
