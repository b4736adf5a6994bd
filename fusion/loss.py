"""Fused LM + sparse soft cross-entropy loss through a chunked LM head.

For final hidden states ``h[b, t]``, LM-head weight ``W[V, H]`` and logits
``z[b, t] = W h[b, t]``, with ``log p = log_softmax(z)``::

    loss = lam       / N_lm   * sum_{(b,t): y[b,t+1] != -100}  -log p[b,t][y[b,t+1]]
         + (1 - lam) / N_soft * sum_{(b,t): soft_valid[b,t]}   sum_i -q[b,t,i] * log p[b,t][j[b,t,i]]

``y`` are the labels (HF convention: position t's logits predict ``labels[:, t+1]``; the last
position has no LM target), ``(j, q)`` the fused sparse target of ``fusion_weights`` (already
aligned so position t predicts token t+1; duplicated ``j`` simply add). ``N_lm`` / ``N_soft``
default to the local counts of LM / soft-valid positions; a data-parallel trainer passes the
GLOBAL counts (summed over ranks) so that the per-rank losses add up to the loss of the whole
batch. A term whose normaliser is 0 contributes 0 (all-masked batch: loss 0, gradients 0).

Memory: the logits are never materialised for all positions. Positions are processed in
chunks of ``chunk_size`` rows (only positions that carry an LM or soft target); per chunk the
forward pass computes the logits in fp32, both loss terms and directly the gradient of the
loss w.r.t. the logits::

    dloss/dz[b,t] = softmax(z[b,t]) * (c_lm * m_lm[b,t] + c_soft * m_soft[b,t] * sum_i q[b,t,i])
                    - c_lm * m_lm[b,t] * onehot(y[b,t+1])
                    - c_soft * m_soft[b,t] * sum_i q[b,t,i] * onehot(j[b,t,i])

with ``c_lm = lam / N_lm`` and ``c_soft = (1 - lam) / N_soft``, from which it accumulates
``dloss/dh = dloss/dz @ W`` and ``dloss/dW = sum_chunks dloss/dz^T @ h``. Backward only scales the
stored gradients by the incoming gradient. Peak extra memory is one ``[chunk_size, V]`` fp32
buffer plus fp32 ``[V, H]`` for the weight gradient (and an fp32 copy of ``W`` when it is
bf16/fp16). ``auto_chunk_size`` picks the chunk size from a memory budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100


def chunk_bytes_per_row(vocab_size: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes one position of a chunk holds at once in ``fused_lm_loss``.

    Per row: its fp32 logits, turned in place into probabilities and then into the logits'
    gradient (``4·V``); the gathered hidden state in its dtype and in fp32, its fp32 gradient and
    that gradient cast back (``(2·b + 8)·H`` with ``b`` the hidden dtype's bytes)::

        bytes_per_row = 4·V + (2·b + 8)·H
    """
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    return 4 * vocab_size + (2 * dtype_bytes + 8) * hidden_size


def auto_chunk_size(vocab_size: int, hidden_size: int, dtype: torch.dtype, memory_bytes: float) -> int:
    """The most positions per chunk whose buffers fit ``memory_bytes`` (``trainer.loss_chunk_size: auto``)::

        chunk_size = max(1, floor(memory_bytes / bytes_per_row))      (``chunk_bytes_per_row``)

    The fp32 ``[V, H]`` weight gradient and weight copy do not depend on the chunk size and are
    not part of the budget. Example: V = 262,144, H = 2,048, bf16, 1 GiB -> 1,000 positions.
    """
    if memory_bytes <= 0:
        raise ValueError(f"memory_bytes={memory_bytes} must be positive (the budget of one LM-head chunk)")
    return max(1, int(memory_bytes // chunk_bytes_per_row(vocab_size, hidden_size, dtype)))


@dataclass(frozen=True)
class FusedLossStats:
    """Local sums and counts for logging token-weighted means (all-reduce them, then divide).

    Attributes:
        lm_loss_sum: 0-dim float32, sum of the per-position LM cross-entropies (nats).
        soft_loss_sum: 0-dim float32, sum of the per-position soft cross-entropies (nats).
        lm_count: 0-dim int64, number of positions with an LM target.
        soft_count: 0-dim int64, number of soft-valid positions.
    """

    lm_loss_sum: Tensor
    soft_loss_sum: Tensor
    lm_count: Tensor
    soft_count: Tensor


def fused_lm_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    soft_indices: Tensor,
    soft_probs: Tensor,
    soft_valid: Tensor,
    lam: float,
    chunk_size: int,
    lm_normalizer: Tensor | float | None = None,
    soft_normalizer: Tensor | float | None = None,
) -> tuple[Tensor, FusedLossStats]:
    """Combined LM + soft cross-entropy loss (equations in the module docstring).

    Args:
        hidden: ``[B, L, H]`` final hidden states (fp32/bf16/fp16), usually requiring grad.
        lm_head_weight: ``[V, H]`` LM-head weight (already gathered when sharded); no bias.
        labels: ``[B, L]`` int target ids, ``-100`` where ignored (unshifted HF convention).
        soft_indices: ``[B, L, K]`` int target-vocab ids of the fused sparse target.
        soft_probs: ``[B, L, K]`` float fused probabilities (0 in unused slots).
        soft_valid: ``[B, L]`` bool, positions that have a soft target.
        lam: weight ``λ`` of the LM term, in [0, 1].
        chunk_size: positions per chunk of the LM head; the chunk's logits take
            ``chunk_size * V * 4`` bytes (on CPU, speed is flat from 256 to 2048 rows).
        lm_normalizer: ``N_lm``; default the local number of LM positions.
        soft_normalizer: ``N_soft``; default the local number of soft-valid positions.

    Returns:
        ``(loss, stats)``: 0-dim float32 loss (differentiable w.r.t. ``hidden`` and
        ``lm_head_weight``; gradients come back in their dtypes) and ``FusedLossStats``.

    Raises:
        ValueError: shape mismatch, ``lam`` outside [0, 1], ``chunk_size < 1``, or a label /
            soft index outside ``[0, V)``.
    """
    _check_inputs(hidden, lm_head_weight, labels, soft_indices, soft_probs, soft_valid, lam, chunk_size)
    batch, length, width = hidden.shape
    vocab = lm_head_weight.shape[0]
    rows = batch * length
    slots = soft_indices.shape[2]

    # Position t predicts labels[:, t+1]; the last position has no LM target.
    lm_targets = torch.cat([labels[:, 1:], labels.new_full((batch, 1), IGNORE_INDEX)], dim=1).reshape(rows).long()
    lm_mask = lm_targets != IGNORE_INDEX
    soft_mask = soft_valid.reshape(rows).bool()
    soft_idx = soft_indices.reshape(rows, slots).long()
    if bool(((lm_targets < 0) & lm_mask).any()) or bool((lm_targets >= vocab).any()):
        raise ValueError(f"labels must be -100 or in [0, {vocab}) (the LM head's vocabulary size)")
    if soft_idx.numel() and (bool((soft_idx < 0).any()) or bool((soft_idx >= vocab).any())):
        raise ValueError(f"soft_indices must be in [0, {vocab}) (the LM head's vocabulary size)")

    lm_count = lm_mask.sum()
    soft_count = soft_mask.sum()
    lm_coef = _coefficient(lam, lm_count if lm_normalizer is None else lm_normalizer, hidden.device)
    soft_coef = _coefficient(1.0 - lam, soft_count if soft_normalizer is None else soft_normalizer, hidden.device)

    # Inside autograd.Function.forward grad mode is off, so decide here which gradients to build.
    grad_enabled = torch.is_grad_enabled()
    loss, lm_sum, soft_sum = _ChunkedFusedLoss.apply(
        hidden.reshape(rows, width),
        lm_head_weight,
        lm_targets,
        lm_mask,
        soft_idx,
        soft_probs.reshape(rows, slots),
        soft_mask,
        lm_coef,
        soft_coef,
        chunk_size,
        grad_enabled and hidden.requires_grad,
        grad_enabled and lm_head_weight.requires_grad,
    )
    stats = FusedLossStats(lm_loss_sum=lm_sum, soft_loss_sum=soft_sum, lm_count=lm_count, soft_count=soft_count)
    return loss, stats


class _ChunkedFusedLoss(torch.autograd.Function):
    """Loss and its gradients computed together, chunk by chunk, in forward."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,  # [N, H]
        weight: Tensor,  # [V, H]
        lm_targets: Tensor,  # [N] int64, -100 where ignored
        lm_mask: Tensor,  # [N] bool
        soft_idx: Tensor,  # [N, K] int64
        soft_probs: Tensor,  # [N, K]
        soft_mask: Tensor,  # [N] bool
        lm_coef: Tensor,  # 0-dim fp32
        soft_coef: Tensor,  # 0-dim fp32
        chunk_size: int,
        need_grad_hidden: bool,
        need_grad_weight: bool,
    ):
        weight32 = weight.float()
        grad_hidden = torch.zeros_like(hidden) if need_grad_hidden else None
        grad_weight = torch.zeros_like(weight32) if need_grad_weight else None
        lm_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        soft_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)

        # Positions without any target contribute nothing: skip their LM-head rows entirely.
        active = torch.nonzero(lm_mask | soft_mask).squeeze(1)
        for start in range(0, active.numel(), chunk_size):
            rows = active[start : start + chunk_size]
            lm_part, soft_part, grad_h = _chunk_loss_and_grads(
                hidden.index_select(0, rows).float(),
                weight32,
                lm_targets.index_select(0, rows),
                soft_idx.index_select(0, rows),
                soft_probs.index_select(0, rows).float() * soft_mask.index_select(0, rows).unsqueeze(1),
                lm_coef,
                soft_coef,
                need_grad_hidden,
                grad_weight,
            )
            lm_sum += lm_part
            soft_sum += soft_part
            if need_grad_hidden:
                grad_hidden.index_copy_(0, rows, grad_h.to(hidden.dtype))

        loss = lm_coef * lm_sum + soft_coef * soft_sum
        if need_grad_weight:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(lm_sum, soft_sum)
        return loss, lm_sum, soft_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_lm_sum: Tensor, _grad_soft_sum: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # The common case (plain loss.backward()) needs no [V, H] multiply.
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            grad_hidden = None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype)
            grad_weight = None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None, None


def _chunk_loss_and_grads(
    h: Tensor,  # [c, H] fp32
    weight32: Tensor,  # [V, H] fp32
    lm_targets: Tensor,  # [c] int64, -100 where ignored
    soft_idx: Tensor,  # [c, K] int64
    q: Tensor,  # [c, K] fp32, zero at soft-invalid positions
    lm_coef: Tensor,
    soft_coef: Tensor,
    need_grad_hidden: bool,
    grad_weight: Tensor | None,  # [V, H] fp32 accumulator, updated in place
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Loss sums of one chunk; accumulates dloss/dW and returns dloss/dh ([c, H]) if asked.

    A function of its own so that the [c, V] buffer is freed on return, before the next
    chunk allocates its own (otherwise two would be alive at once).
    """
    logits = h @ weight32.t()  # [c, V], the only vocabulary-sized buffer
    lm_mask = lm_targets != IGNORE_INDEX
    target = lm_targets.clamp_min(0).unsqueeze(1)
    z_target = logits.gather(1, target).squeeze(1)
    z_soft = logits.gather(1, soft_idx)
    q_sum = q.sum(dim=1)

    # Softmax in place (after the gathers above): no second [c, V] buffer.
    z_max = logits.amax(dim=1, keepdim=True)
    probs = logits.sub_(z_max).exp_()
    sum_exp = probs.sum(dim=1, keepdim=True)
    lse = (z_max + sum_exp.log()).squeeze(1)
    lm_part = ((lse - z_target) * lm_mask).sum()
    soft_part = (lse * q_sum - (q * z_soft).sum(dim=1)).sum()
    if not need_grad_hidden and grad_weight is None:
        return lm_part, soft_part, None

    lm_weight = lm_coef * lm_mask
    grad_logits = probs.mul_((lm_weight + soft_coef * q_sum).unsqueeze(1) / sum_exp)
    grad_logits.scatter_add_(1, target, -lm_weight.unsqueeze(1))
    grad_logits.scatter_add_(1, soft_idx, -soft_coef * q)
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits.t(), h)
    return lm_part, soft_part, grad_logits @ weight32 if need_grad_hidden else None


def _coefficient(share: float, normalizer: Tensor | float, device: torch.device) -> Tensor:
    """``share / normalizer``, or 0 when the normaliser is 0 (nothing to average)."""
    n = torch.as_tensor(normalizer, dtype=torch.float32, device=device)
    return torch.where(n > 0, share / n.clamp_min(1e-30), 0.0)


def _check_inputs(hidden: Tensor, weight: Tensor, labels: Tensor, soft_indices: Tensor, soft_probs: Tensor,
                  soft_valid: Tensor, lam: float, chunk_size: int) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, L, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"lm_head_weight must be [V, H] with H={hidden.shape[2]} like hidden, got {tuple(weight.shape)}"
        )
    batch_length = tuple(hidden.shape[:2])
    if tuple(labels.shape) != batch_length or tuple(soft_valid.shape) != batch_length:
        raise ValueError(
            f"labels {tuple(labels.shape)} and soft_valid {tuple(soft_valid.shape)} must be [B, L] = {batch_length}"
        )
    if soft_indices.dim() != 3 or tuple(soft_indices.shape[:2]) != batch_length:
        raise ValueError(
            f"soft_indices must be [B, L, K] with [B, L] = {batch_length}, got {tuple(soft_indices.shape)}"
        )
    if soft_probs.shape != soft_indices.shape:
        raise ValueError(f"soft_probs {tuple(soft_probs.shape)} must match soft_indices {tuple(soft_indices.shape)}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam={lam} must be in [0, 1] (weight of the LM term)")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (positions per LM-head chunk)")
