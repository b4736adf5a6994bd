"""Dynamic weighted fusion: S sparse source answers -> one sparse target distribution.

Notation: ``b`` sequence, ``t`` target position, ``s`` source (one of the S sources whose
answers are present in the batch), ``i`` one of source s's ``k_s`` kept candidates.

1. Sequence weights (``chosen_weights``): the gate probabilities ``g[b, s]`` of the chosen
   sources, renormalised per sequence::

       w[b, s] = g[b, s] * c[b, s] / sum_s' g[b, s'] * c[b, s']        (c = chosen mask)

2. Optional sharpening by each source's realised score on this batch, its negative
   log-likelihood of the gold text per UTF-8 byte ``n[b, s]`` ("inherent strength"),
   with sharpening temperature ``T_s`` (``sharpen_weights``)::

       w'[b, s] = w[b, s] * exp(-n[b, s] / T_s) / sum_s' w[b, s'] * exp(-n[b, s'] / T_s)

   Small ``T_s`` moves the weight to the best source of the sequence; ``T_s -> inf``
   leaves ``w`` unchanged.

3. Per-source candidate distribution at temperature ``T`` (``fuse_soft_labels``), renormalised
   over the candidates that were kept (dropped candidates have log-prob ``-inf``)::

       q[b, t, s, i] = exp(lp[b, t, s, i] / T) / sum_j exp(lp[b, t, s, j] / T)

4. Per-position weights: a source that is not valid at (b, t) (no shared boundary, padding,
   every candidate dropped) gives up its weight and the others are renormalised::

       v[b, t, s] = valid[b, t, s] and any_i lp[b, t, s, i] > -inf
       a[b, t, s] = w[b, s] * v[b, t, s] / sum_s' w[b, s'] * v[b, t, s']
       soft_valid[b, t] = (sum_s' w[b, s'] * v[b, t, s'] > 0)

   Where ``soft_valid`` is false every fused probability is 0.

5. The fused target is the concatenation over sources (``K = sum_s k_s`` slots)::

       indices[b, t, (s, i)] = idx[b, t, s, i]
       probs[b, t, (s, i)]   = a[b, t, s] * q[b, t, s, i]

   Candidates of different sources that map to the same target token are NOT merged: the
   soft cross-entropy sums ``-probs * log_softmax(logits)[indices]`` over slots, so their
   terms simply add, which equals the loss against the merged dense distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import Tensor


class SoftLabelsLike(Protocol):
    """What fusion reads from one source's answer (``fusion.sources.answer.SparseSoftLabels``)."""

    indices: Tensor  # [B, L, k] integer target-vocab ids
    logprobs: Tensor  # [B, L, k] float, -inf where the candidate was dropped
    valid: Tensor  # [B, L] bool


@dataclass(frozen=True)
class FusedSoftTarget:
    """One fused sparse target distribution per target position.

    Attributes:
        indices: ``[B, L, K]`` int64 target-vocab ids, ``K = sum_s k_s`` (sources concatenated
            in the order given; duplicates across sources are kept).
        probs: ``[B, L, K]`` float32; sums to 1 over K where ``valid`` and is 0 elsewhere.
        valid: ``[B, L]`` bool, true where at least one source with non-zero weight is valid.
    """

    indices: Tensor
    probs: Tensor
    valid: Tensor


def empty_soft_target(batch_size: int, length: int) -> FusedSoftTarget:
    """No soft label anywhere (K = 0): the loss is the LM term alone."""
    return FusedSoftTarget(torch.zeros((batch_size, length, 0), dtype=torch.long), torch.zeros((batch_size, length, 0)),
                           torch.zeros((batch_size, length), dtype=torch.bool))


def chosen_weights(gate_probs: Tensor, chosen: Tensor) -> Tensor:
    """Renormalise the gate probabilities of the chosen sources per sequence.

    Args:
        gate_probs: ``[B, S]`` non-negative gate probabilities.
        chosen: ``[B, S]`` bool, the sources that ran for each sequence.

    Returns:
        ``[B, S]`` float32 weights summing to 1 per sequence, 0 for sources not chosen; a row
        with no chosen source (or zero probability on all chosen ones) is all zeros.

    Raises:
        ValueError: shapes differ or ``gate_probs`` has negative entries.
    """
    if gate_probs.shape != chosen.shape or gate_probs.dim() != 2:
        raise ValueError(
            f"gate_probs {tuple(gate_probs.shape)} and chosen {tuple(chosen.shape)} must both be [B, S]"
        )
    if bool((gate_probs < 0).any()):
        raise ValueError("gate_probs has negative entries; pass softmax probabilities, not logits")
    masked = gate_probs.detach().float() * chosen.float()
    return _normalise_rows(masked)


def sharpen_weights(weights: Tensor, nll_per_byte: Tensor, temperature: float) -> Tensor:
    """Sharpen sequence weights by realised scores: ``w' ∝ w * exp(-nll_per_byte / temperature)``.

    Args:
        weights: ``[B, S]`` non-negative sequence weights (0 for sources not chosen).
        nll_per_byte: ``[B, S]`` each source's NLL per UTF-8 byte of the gold text; entries of
            sources with zero weight are ignored (they may be NaN/inf: those sources did not run).
        temperature: sharpening temperature ``T_s`` > 0 (``fusion.sharpen_temperature``).

    Returns:
        ``[B, S]`` float32 weights summing to 1 per sequence (all-zero rows stay zero).

    Raises:
        ValueError: shapes differ, ``temperature <= 0``, or a source with non-zero weight has a
            non-finite score.
    """
    if weights.shape != nll_per_byte.shape or weights.dim() != 2:
        raise ValueError(
            f"weights {tuple(weights.shape)} and nll_per_byte {tuple(nll_per_byte.shape)} must both be [B, S]"
        )
    if not temperature > 0:
        raise ValueError(f"sharpening temperature={temperature} must be > 0 (use a large value for no sharpening)")
    active = weights > 0
    nll = nll_per_byte.float()
    if bool((active & ~torch.isfinite(nll)).any()):
        raise ValueError("nll_per_byte is NaN/inf for a source with non-zero weight; every chosen source needs a score")
    # Work in log space: exp(-nll / temperature) under- or overflows when it is small.
    log_w = torch.where(active, weights.float().log() - nll / temperature, -torch.inf)
    # An all-zero row has shift -inf; clamping keeps it finite so the row stays zero, not NaN.
    shift = log_w.amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    return _normalise_rows(torch.where(active, (log_w - shift).exp(), 0.0))


def fuse_soft_labels(
    answers: Sequence[SoftLabelsLike], weights: Tensor, temperature: float = 1.0
) -> FusedSoftTarget:
    """Fuse S sparse source answers into one sparse target (equations in the module docstring).

    Args:
        answers: S answers, source ``s`` with ``indices[B, L, k_s]``, ``logprobs[B, L, k_s]``
            (full-vocab log-probs at temperature 1, ``-inf`` where dropped), ``valid[B, L]``.
        weights: ``[B, S]`` non-negative sequence weights (``chosen_weights`` /
            ``sharpen_weights`` / ``selection.baseline_weights``); need not be normalised.
        temperature: ``T`` > 0 applied to each source's log-probs before renormalising over
            its kept candidates.

    Returns:
        ``FusedSoftTarget`` with ``indices``/``probs`` of shape ``[B, L, sum_s k_s]``.

    Raises:
        ValueError: no answers, shape mismatch between answers or with ``weights``, negative
            weights or ``temperature <= 0``.
    """
    if len(answers) == 0:
        raise ValueError("fuse_soft_labels needs at least one source answer")
    if not temperature > 0:
        raise ValueError(f"fusion temperature={temperature} must be > 0")
    batch, length = answers[0].valid.shape
    if weights.shape != (batch, len(answers)):
        raise ValueError(
            f"weights has shape {tuple(weights.shape)}, expected [B, S] = [{batch}, {len(answers)}] "
            "(one column per answer, in the same order)"
        )
    if bool((weights < 0).any()):
        raise ValueError("weights has negative entries; sequence weights must be >= 0")
    for s, answer in enumerate(answers):
        _check_answer(s, answer, batch, length)

    dists, usable = [], []
    for answer in answers:
        logprobs = answer.logprobs.float()
        kept = torch.isfinite(logprobs)
        has_candidate = kept.any(dim=-1)
        # Rows without any kept candidate would softmax to NaN; they are invalid anyway.
        scaled = torch.where(has_candidate.unsqueeze(-1), logprobs / temperature, 0.0)
        dist = torch.softmax(scaled, dim=-1) * kept
        dists.append(dist)
        usable.append(answer.valid.bool() & has_candidate)

    position_weights = weights.float().unsqueeze(1) * torch.stack(usable, dim=-1)  # [B, L, S]
    total = position_weights.sum(dim=-1, keepdim=True)
    soft_valid = total.squeeze(-1) > 0
    position_weights = torch.where(total > 0, position_weights / total.clamp_min(torch.finfo(torch.float32).tiny), 0.0)

    probs = torch.cat([position_weights[..., s : s + 1] * dist for s, dist in enumerate(dists)], dim=-1)
    indices = torch.cat([answer.indices.long() for answer in answers], dim=-1)
    return FusedSoftTarget(indices=indices, probs=probs, valid=soft_valid)


def _normalise_rows(values: Tensor) -> Tensor:
    total = values.sum(dim=1, keepdim=True)
    return torch.where(total > 0, values / total.clamp_min(torch.finfo(values.dtype).tiny), 0.0)


def _check_answer(s: int, answer: SoftLabelsLike, batch: int, length: int) -> None:
    if answer.valid.shape != (batch, length):
        raise ValueError(
            f"answer {s}: valid has shape {tuple(answer.valid.shape)}, expected [{batch}, {length}] like answer 0"
        )
    if answer.indices.dim() != 3 or answer.indices.shape[:2] != (batch, length):
        raise ValueError(
            f"answer {s}: indices has shape {tuple(answer.indices.shape)}, expected [{batch}, {length}, k]"
        )
    if answer.logprobs.shape != answer.indices.shape:
        raise ValueError(
            f"answer {s}: logprobs {tuple(answer.logprobs.shape)} and indices {tuple(answer.indices.shape)} differ"
        )
