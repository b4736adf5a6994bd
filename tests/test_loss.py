"""Fused sparse loss and dynamic weighted fusion against dense / hand-computed references."""

import math
from dataclasses import dataclass

import pytest
import torch

from fusion.fusion_weights import chosen_weights, fuse_soft_labels, sharpen_weights
from fusion.loss import fused_lm_loss

VOCAB, HIDDEN = 97, 11


@dataclass
class Answer:
    indices: torch.Tensor
    logprobs: torch.Tensor
    valid: torch.Tensor


def make_answer(gen, batch, length, k, vocab=VOCAB, drop=0.2, invalid=0.2):
    """Random source answer with dropped candidates (-inf) and invalid positions."""
    indices = torch.randint(0, vocab, (batch, length, k), generator=gen)
    logprobs = torch.log_softmax(torch.randn(batch, length, vocab, generator=gen), -1).gather(2, indices)
    dropped = torch.rand(batch, length, k, generator=gen) < drop
    indices = indices.masked_fill(dropped, 0)
    logprobs = logprobs.masked_fill(dropped, -math.inf)
    valid = torch.rand(batch, length, generator=gen) >= invalid
    return Answer(indices.int(), logprobs, valid)


def make_labels(gen, batch, length, vocab=VOCAB, ignored=0.25):
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    return labels.masked_fill(torch.rand(batch, length, generator=gen) < ignored, -100)


def dense_loss(hidden, weight, labels, soft_indices, soft_probs, soft_valid, lam, n_lm=None, n_soft=None):
    """Reference: full logits, dense [B, L, V] target by scatter_add, plain autograd, float64."""
    logp = torch.log_softmax(hidden.double() @ weight.double().t(), dim=-1)
    targets = labels[:, 1:]
    lm_mask = targets != -100
    lm_terms = -logp[:, :-1].gather(2, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    lm_sum = (lm_terms * lm_mask).sum()
    dense = torch.zeros(logp.shape, dtype=torch.float64).scatter_add_(2, soft_indices.long(), soft_probs.double())
    soft_sum = (-(dense * logp).sum(-1) * soft_valid).sum()
    n_lm = lm_mask.sum() if n_lm is None else n_lm
    n_soft = soft_valid.sum() if n_soft is None else n_soft
    lm = lam * lm_sum / n_lm if n_lm > 0 else lm_sum * 0
    soft = (1 - lam) * soft_sum / n_soft if n_soft > 0 else soft_sum * 0
    return lm + soft


def dense_fused_target(answers, weights, temperature):
    """Reference fusion: every source's distribution as a dense [B, L, V] tensor, then mixed."""
    batch, length = answers[0].valid.shape
    per_source, usable = [], []
    for a in answers:
        dense = torch.zeros(batch, length, VOCAB, dtype=torch.float64)
        unnorm = torch.exp(a.logprobs.double() / temperature)  # exp(-inf) = 0 for dropped
        dense.scatter_add_(2, a.indices.long(), unnorm)
        total = dense.sum(-1, keepdim=True)
        per_source.append(torch.where(total > 0, dense / total, 0.0))
        usable.append(a.valid & (total.squeeze(-1) > 0))
    mix = torch.zeros(batch, length, VOCAB, dtype=torch.float64)
    norm = torch.zeros(batch, length, dtype=torch.float64)
    for s, (dense, ok) in enumerate(zip(per_source, usable)):
        w = weights[:, s].double().unsqueeze(1) * ok
        mix += w.unsqueeze(-1) * dense
        norm += w
    valid = norm > 0
    return torch.where(valid.unsqueeze(-1), mix / norm.clamp_min(1e-300).unsqueeze(-1), 0.0), valid


def random_problem(seed, batch=3, length=13, sources=3, k=5, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, HIDDEN, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5).to(dtype).requires_grad_()
    labels = make_labels(gen, batch, length)
    answers = [make_answer(gen, batch, length, k) for _ in range(sources)]
    # Duplicates across sources: source 1 repeats some of source 0's candidates.
    answers[1].indices[..., :2] = answers[0].indices[..., :2]
    weights = torch.rand(batch, sources, generator=gen)
    weights[0, -1] = 0.0
    return hidden, weight, labels, answers, weights


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_sparse_loss_and_grads_match_dense_reference(chunk_size):
    hidden, weight, labels, answers, weights = random_problem(0)
    fused = fuse_soft_labels(answers, weights, temperature=1.3)
    assert bool(fused.valid.any()) and bool((~fused.valid).any())
    assert bool((labels[:, 1:] == -100).any())

    loss, stats = fused_lm_loss(
        hidden, weight, labels, fused.indices, fused.probs, fused.valid, lam=0.7, chunk_size=chunk_size
    )
    loss.backward()
    h_ref = hidden.detach().clone().requires_grad_()
    w_ref = weight.detach().clone().requires_grad_()
    ref = dense_loss(h_ref, w_ref, labels, fused.indices, fused.probs, fused.valid, lam=0.7)
    ref.backward()

    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert rel_err(hidden.grad, h_ref.grad) < 1e-5
    assert rel_err(weight.grad, w_ref.grad) < 1e-5
    assert stats.lm_count.item() == int((labels[:, 1:] != -100).sum())
    assert stats.soft_count.item() == int(fused.valid.sum())
    lm_only = dense_loss(hidden.detach(), weight.detach(), labels, fused.indices, fused.probs, fused.valid, lam=1.0)
    assert stats.lm_loss_sum.item() / stats.lm_count.item() == pytest.approx(lm_only.item(), rel=1e-5)


def test_fusion_then_loss_matches_dense_mixture_of_sources():
    """Sparse fused target (duplicates unmerged) gives the loss of the dense mixture of sources."""
    hidden, weight, labels, answers, weights = random_problem(1, sources=4, k=6)
    fused = fuse_soft_labels(answers, weights, temperature=0.8)
    dense_target, dense_valid = dense_fused_target(answers, weights, temperature=0.8)
    assert torch.equal(fused.valid, dense_valid)

    loss, _ = fused_lm_loss(hidden, weight, labels, fused.indices, fused.probs, fused.valid, lam=0.0, chunk_size=5)
    logp = torch.log_softmax(hidden.detach().double() @ weight.detach().double().t(), -1)
    ref = (-(dense_target * logp).sum(-1) * dense_valid).sum() / dense_valid.sum()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_normalizers_make_rank_shards_sum_to_global_loss():
    hidden, weight, labels, answers, weights = random_problem(2, batch=5)
    fused = fuse_soft_labels(answers, weights, temperature=1.0)
    args = dict(lam=0.6, chunk_size=4)
    full, _ = fused_lm_loss(hidden, weight, labels, fused.indices, fused.probs, fused.valid, **args)
    full.backward()
    full_grad_h, full_grad_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None

    n_lm = (labels[:, 1:] != -100).sum()  # what an all-reduce over ranks would give
    n_soft = fused.valid.sum()
    total = 0.0
    for part in (slice(0, 2), slice(2, 5)):
        shard, _ = fused_lm_loss(
            hidden[part], weight, labels[part], fused.indices[part], fused.probs[part], fused.valid[part],
            lm_normalizer=n_lm, soft_normalizer=n_soft, **args,
        )
        shard.backward()
        total += shard.item()
    assert total == pytest.approx(full.item(), rel=1e-5)
    assert rel_err(hidden.grad, full_grad_h) < 1e-5
    assert rel_err(weight.grad, full_grad_w) < 1e-5


def test_all_masked_batch_gives_zero_loss_and_zero_grads():
    hidden, weight, labels, answers, _ = random_problem(3)
    labels = torch.full_like(labels, -100)
    no_weight = torch.zeros(hidden.shape[0], len(answers))
    fused = fuse_soft_labels(answers, no_weight, temperature=1.0)
    assert not bool(fused.valid.any()) and float(fused.probs.abs().sum()) == 0.0

    loss, stats = fused_lm_loss(hidden, weight, labels, fused.indices, fused.probs, fused.valid, lam=0.9, chunk_size=8)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert float(hidden.grad.abs().sum()) == 0.0 and float(weight.grad.abs().sum()) == 0.0
    assert stats.lm_count.item() == 0 and stats.soft_count.item() == 0


def test_bf16_inputs_close_to_fp32_reference_and_keep_dtype():
    hidden, weight, labels, answers, weights = random_problem(4, dtype=torch.bfloat16)
    fused = fuse_soft_labels(answers, weights, temperature=1.0)
    loss, _ = fused_lm_loss(hidden, weight, labels, fused.indices, fused.probs, fused.valid, lam=0.5, chunk_size=6)
    loss.backward()
    assert loss.dtype == torch.float32
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16

    # The reference sees exactly the bf16 values (upcast), so only gradient rounding differs.
    h_ref = hidden.detach().float().requires_grad_()
    w_ref = weight.detach().float().requires_grad_()
    ref = dense_loss(h_ref, w_ref, labels, fused.indices, fused.probs, fused.valid, lam=0.5)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert rel_err(hidden.grad, h_ref.grad) < 1e-2
    assert rel_err(weight.grad, w_ref.grad) < 1e-2


def test_scaled_backward_and_no_grad_evaluation():
    hidden, weight, labels, answers, weights = random_problem(5)
    fused = fuse_soft_labels(answers, weights, temperature=1.0)
    args = (labels, fused.indices, fused.probs, fused.valid)
    loss, _ = fused_lm_loss(hidden, weight, *args, lam=0.9, chunk_size=9)
    (3.0 * loss).backward()
    h_ref = hidden.detach().clone().requires_grad_()
    ref = dense_loss(h_ref, weight.detach(), *args, lam=0.9)
    (3.0 * ref).backward()
    assert rel_err(hidden.grad, h_ref.grad) < 1e-5

    with torch.no_grad():
        evaluated, _ = fused_lm_loss(hidden, weight, *args, lam=0.9, chunk_size=9)
    assert evaluated.item() == pytest.approx(loss.item(), rel=1e-6)


def test_loss_rejects_out_of_range_ids_and_bad_lambda():
    hidden, weight, labels, answers, weights = random_problem(6)
    fused = fuse_soft_labels(answers, weights, temperature=1.0)
    bad_labels = labels.clone()
    bad_labels[0, 3] = VOCAB
    with pytest.raises(ValueError, match="labels"):
        fused_lm_loss(hidden, weight, bad_labels, fused.indices, fused.probs, fused.valid, lam=0.5, chunk_size=4)
    with pytest.raises(ValueError, match="lam"):
        fused_lm_loss(hidden, weight, labels, fused.indices, fused.probs, fused.valid, lam=1.5, chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_lm_loss(hidden, weight, labels, fused.indices, fused.probs, fused.valid, lam=0.5, chunk_size=0)


def test_fusion_renormalises_weights_at_invalid_positions_hand_computed():
    # One sequence, two positions, two sources with k=2; weights 0.25 / 0.75.
    a = Answer(
        indices=torch.tensor([[[3, 5], [1, 2]]]),
        logprobs=torch.tensor([[[math.log(0.3), math.log(0.1)], [math.log(0.5), -math.inf]]]),
        valid=torch.tensor([[True, True]]),
    )
    b = Answer(
        indices=torch.tensor([[[5, 7], [4, 6]]]),
        logprobs=torch.tensor([[[math.log(0.2), math.log(0.2)], [math.log(0.4), math.log(0.1)]]]),
        valid=torch.tensor([[True, False]]),
    )
    fused = fuse_soft_labels([a, b], torch.tensor([[0.25, 0.75]]), temperature=1.0)
    # t=0: both valid. a -> (0.75, 0.25), b -> (0.5, 0.5); weights 0.25 / 0.75.
    # t=1: b invalid, so a gets all the weight; a's dropped candidate gets 0.
    expected = torch.tensor([[[0.25 * 0.75, 0.25 * 0.25, 0.75 * 0.5, 0.75 * 0.5], [1.0, 0.0, 0.0, 0.0]]])
    torch.testing.assert_close(fused.probs, expected)
    assert fused.indices.tolist() == [[[3, 5, 5, 7], [1, 2, 4, 6]]]
    assert fused.valid.tolist() == [[True, True]]

    # Temperature 2 on a at t=0: sqrt(0.3) : sqrt(0.1).
    hot = fuse_soft_labels([a, b], torch.tensor([[1.0, 0.0]]), temperature=2.0)
    r = math.sqrt(0.3) / (math.sqrt(0.3) + math.sqrt(0.1))
    assert hot.probs[0, 0, :2].tolist() == pytest.approx([r, 1 - r], rel=1e-6)
    assert hot.probs[0, 0, 2:].tolist() == [0.0, 0.0]

    # A position where no source with weight is valid: zero probs, soft_valid False.
    b_only = fuse_soft_labels([a, b], torch.tensor([[0.0, 1.0]]), temperature=1.0)
    assert b_only.valid.tolist() == [[True, False]]
    assert b_only.probs[0, 1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_all_candidates_dropped_counts_as_invalid():
    a = Answer(torch.zeros(1, 1, 2, dtype=torch.int32), torch.full((1, 1, 2), -math.inf), torch.tensor([[True]]))
    b = Answer(torch.tensor([[[4, 9]]]), torch.log(torch.tensor([[[0.6, 0.2]]])), torch.tensor([[True]]))
    fused = fuse_soft_labels([a, b], torch.tensor([[0.5, 0.5]]), temperature=1.0)
    torch.testing.assert_close(fused.probs, torch.tensor([[[0.0, 0.0, 0.75, 0.25]]]))


def test_chosen_and_sharpened_weights_hand_computed():
    gate = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    chosen = torch.tensor([[True, True, False], [False, False, False]])
    w = chosen_weights(gate, chosen)
    torch.testing.assert_close(w, torch.tensor([[0.625, 0.375, 0.0], [0.0, 0.0, 0.0]]))

    nll = torch.tensor([[1.0, 0.5, math.nan], [2.0, 2.0, 2.0]])
    sharp = sharpen_weights(w, nll, temperature=0.5)
    # w' ∝ w * exp(-nll / tau): 0.625 e^-2 vs 0.375 e^-1.
    a, b = 0.625 * math.exp(-2.0), 0.375 * math.exp(-1.0)
    assert sharp[0].tolist() == pytest.approx([a / (a + b), b / (a + b), 0.0], rel=1e-6)
    assert sharp[1].tolist() == [0.0, 0.0, 0.0]
    # Large scores with small tau must not underflow to NaN.
    tiny_tau = sharpen_weights(w, nll * 1000, temperature=1e-3)
    assert torch.isfinite(tiny_tau).all() and tiny_tau[0].tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_fusion_rejects_mismatched_inputs():
    gen = torch.Generator().manual_seed(7)
    a, b = make_answer(gen, 2, 5, 3), make_answer(gen, 2, 6, 3)
    with pytest.raises(ValueError, match="answer 1"):
        fuse_soft_labels([a, b], torch.ones(2, 2))
    with pytest.raises(ValueError, match="weights"):
        fuse_soft_labels([a], torch.ones(2, 2))
    with pytest.raises(ValueError, match="non-zero weight"):
        sharpen_weights(torch.ones(2, 2), torch.tensor([[1.0, math.inf], [1.0, 1.0]]), temperature=1.0)
