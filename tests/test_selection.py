"""Selection rule, selector loss, baselines and two small learning experiments."""

import math
import time

import numpy as np
import pytest
import torch

from fusion.selection import (
    RidgeSelector,
    SelectionNetwork,
    baseline_weights,
    exploration_rate_at,
    select,
    selector_loss,
    selector_regression_loss,
)

VOCAB, LENGTH, SOURCES = 97, 13, 4
# Domain d is the disjoint token set {d, d + 4, d + 8, ...}.
DOMAIN_TOKENS = [torch.arange(d, VOCAB, SOURCES) for d in range(SOURCES)]


def as_mask(rows, sources):
    mask = torch.zeros(len(rows), sources, dtype=torch.bool)
    for b, row in enumerate(rows):
        mask[b, list(row)] = True
    return mask


def test_select_honours_tau_min_max_and_unavailable():
    probs = torch.tensor(
        [
            [0.50, 0.30, 0.15, 0.05],  # 0.15 is not > tau
            [0.90, 0.04, 0.03, 0.03],
            [0.30, 0.30, 0.20, 0.20],  # four above tau, max 3, tie broken by index
            [0.10, 0.10, 0.10, 0.70],
        ]
    )
    chosen = select(probs, tau=0.15, min_sources=1, max_sources=3, exploration_rate=0.0)
    assert torch.equal(chosen, as_mask([{0, 1}, {0}, {0, 1, 2}, {3}], 4))

    chosen = select(probs, tau=0.15, min_sources=2, max_sources=2, exploration_rate=0.0)
    assert torch.equal(chosen, as_mask([{0, 1}, {0, 1}, {0, 1}, {3, 0}], 4))

    down = torch.tensor([False, True, True, False])
    chosen = select(probs, tau=0.15, min_sources=1, max_sources=3, exploration_rate=0.0, available_mask=down)
    assert torch.equal(chosen, as_mask([{1}, {1}, {1, 2}, {1}], 4))
    # min_sources above the number of available sources: all available ones, nothing else.
    chosen = select(probs, tau=0.15, min_sources=3, max_sources=4, exploration_rate=1.0, available_mask=down)
    assert torch.equal(chosen, as_mask([{1, 2}] * 4, 4))

    with pytest.raises(ValueError, match="no source is available"):
        select(probs, 0.15, 1, 2, 0.0, available_mask=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="min_sources"):
        select(probs, 0.15, 3, 2, 0.0)


def test_select_with_families_prefers_distinct_tokenizers_hand_computed():
    probs = torch.tensor([[0.50, 0.30, 0.15, 0.05],
                          [0.10, 0.20, 0.30, 0.40],
                          [0.40, 0.35, 0.20, 0.05]])
    families = torch.tensor([0, 0, 1, 1])  # sources 0 and 1 share a tokenizer, so do 2 and 3
    chosen = select(probs, tau=0.3, min_sources=2, max_sources=2, exploration_rate=0.0, families=families)
    # row 0: 0 then (1 is a second of family 0) 2; row 1: 3 then 1; row 2: 0 then 2, although 1 is above tau
    assert torch.equal(chosen, as_mask([{0, 2}, {3, 1}, {0, 2}], 4))
    # One family: the rule falls back to the best ones by probability.
    assert torch.equal(select(probs, 0.3, 2, 2, 0.0, families=torch.zeros(4, dtype=torch.long)),
                       select(probs, 0.3, 2, 2, 0.0))
    # The first of a family that is down does not hide the family's next source.
    down = torch.tensor([False, True, True, True])
    assert torch.equal(select(probs, 0.3, 2, 2, 0.0, available_mask=down, families=families), as_mask([{1, 2}, {3, 1}, {1, 2}], 4))
    with pytest.raises(ValueError, match="families"):
        select(probs, 0.3, 2, 2, 0.0, families=torch.tensor([0, 1]))


def _select_brute_force(probs, tau, min_sources, max_sources, available, families):
    """The rule one row at a time: rank by probability (ties: lower index), move every source whose
    family has an earlier available source behind the rest (keeping order), then apply tau/min/max."""
    chosen = torch.zeros(probs.shape, dtype=torch.bool)
    for b in range(probs.shape[0]):
        order = sorted((s for s in range(probs.shape[1]) if available[s]), key=lambda s: (-float(probs[b, s]), s))
        seen, firsts, seconds = set(), [], []
        for s in order:
            (seconds if int(families[s]) in seen else firsts).append(s)
            seen.add(int(families[s]))
        for rank, s in enumerate(firsts + seconds):
            chosen[b, s] = (probs[b, s] > tau and rank < max_sources) or rank < min_sources
    return chosen


@pytest.mark.parametrize("seed", range(20))
def test_select_with_families_equals_the_brute_force_rule(seed):
    generator = torch.Generator().manual_seed(seed)
    sources = int(torch.randint(1, 7, (1,), generator=generator))
    probs = torch.randint(0, 5, (16, sources), generator=generator).float().softmax(-1)  # coarse: many ties
    families = torch.randint(0, 3, (sources,), generator=generator)
    available = torch.rand(sources, generator=generator) < 0.8
    available[int(torch.randint(0, sources, (1,), generator=generator))] = True
    max_sources = int(torch.randint(1, sources + 1, (1,), generator=generator))
    min_sources = int(torch.randint(1, max_sources + 1, (1,), generator=generator))
    tau = float(torch.rand(1, generator=generator)) * 0.5
    chosen = select(probs, tau, min_sources, max_sources, 0.0, available_mask=available, families=families)
    assert torch.equal(chosen, _select_brute_force(probs, tau, min_sources, max_sources, available, families))


def test_exploration_rate_is_statistically_right():
    batch, rate = 20000, 0.3
    probs = torch.tensor([0.9, 0.04, 0.03, 0.02, 0.01]).expand(batch, -1)
    available = torch.tensor([True, True, True, True, False])
    gen = torch.Generator().manual_seed(0)
    chosen = select(probs, 0.15, 1, 1, rate, generator=gen, available_mask=available)

    assert bool(chosen[:, 0].all()) and not bool(chosen[:, 4].any())
    extra = chosen.sum(dim=1) - 1
    assert set(extra.unique().tolist()) <= {0, 1}
    sigma = math.sqrt(rate * (1 - rate) / batch)
    assert abs(extra.float().mean().item() - rate) < 4 * sigma
    # The added source is uniform over the three unchosen available ones.
    per_source = chosen[:, 1:4].float().mean(dim=0)
    p = rate / 3
    assert (per_source - p).abs().max().item() < 4 * math.sqrt(p * (1 - p) / batch)

    again = select(probs, 0.15, 1, 1, rate, generator=torch.Generator().manual_seed(0), available_mask=available)
    assert torch.equal(chosen, again)
    assert not bool((select(probs, 0.15, 1, 1, 0.0).sum(1) > 1).any())
    assert bool((select(probs, 0.15, 1, 1, 1.0, available_mask=available).sum(1) == 2).all())


def test_exploration_schedules():
    assert exploration_rate_at(0, 0.2, 0.02, 100, "linear") == pytest.approx(0.2)
    assert exploration_rate_at(50, 0.2, 0.02, 100, "linear") == pytest.approx(0.11)
    assert exploration_rate_at(500, 0.2, 0.02, 100, "linear") == pytest.approx(0.02)
    assert exploration_rate_at(50, 0.2, 0.02, 100, "exponential") == pytest.approx(math.sqrt(0.2 * 0.02))
    assert exploration_rate_at(500, 0.2, 0.02, 100, "exponential") == pytest.approx(0.02)
    assert exploration_rate_at(70, 0.1, 0.0, 100, "constant") == 0.1
    with pytest.raises(ValueError, match="linear"):
        exploration_rate_at(1, 0.1, 0.0, 100, "exponential")
    with pytest.raises(ValueError, match="schedule"):
        exploration_rate_at(1, 0.1, 0.0, 100, "cosine")


def test_selector_loss_hand_computed():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.25, 0.25]])
    logits = probs.log().requires_grad_()
    chosen = as_mask([{0, 1}, {2}, {0, 1, 2}], 3)
    nan = math.nan
    nll = torch.tensor([[1.0, 2.0, nan], [nan, nan, 0.7], [1.0, 1.0, 2.0]])
    loss, stats = selector_loss(logits, chosen, nll, beta=0.5, target_temperature=0.5)

    # Row 0: target softmax(-[1, 2] / 0.5), gate restricted to {0, 1} = (2/3, 1/3).
    r0 = [1 / (1 + math.exp(-2)), math.exp(-2) / (1 + math.exp(-2))]
    ce0 = -(r0[0] * math.log(2 / 3) + r0[1] * math.log(1 / 3))
    # Row 1 ran one source: left out. Row 2: target ∝ (e^-2, e^-2, e^-4), gate (0.5, 0.25, 0.25).
    z = 2 * math.exp(-2) + math.exp(-4)
    r2 = [math.exp(-2) / z, math.exp(-2) / z, math.exp(-4) / z]
    ce2 = -(r2[0] * math.log(0.5) + r2[1] * math.log(0.25) + r2[2] * math.log(0.25))
    # Importance (1.3, 0.75, 0.95): mean 1, population variance (0.09 + 0.0625 + 0.0025) / 3.
    cv2 = (0.09 + 0.0625 + 0.0025) / 3 / 1.0**2

    assert stats.ce.item() == pytest.approx((ce0 + ce2) / 2, rel=1e-5)
    assert stats.cv2.item() == pytest.approx(cv2, rel=1e-5)
    assert stats.importance.tolist() == pytest.approx([1.3, 0.75, 0.95], rel=1e-5)
    assert stats.measured_sequences.item() == 2
    assert loss.item() == pytest.approx((ce0 + ce2) / 2 + 0.5 * cv2, rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_selector_loss_degenerate_cases_are_finite():
    one_source = torch.zeros(4, 1, requires_grad=True)
    loss, stats = selector_loss(one_source, torch.ones(4, 1, dtype=torch.bool), torch.ones(4, 1), 0.5, 1.0)
    loss.backward()
    assert loss.item() == 0.0 and stats.measured_sequences.item() == 0
    assert torch.equal(one_source.grad, torch.zeros(4, 1))

    logits = torch.randn(3, 5, requires_grad=True)
    single = as_mask([{0}, {3}, {4}], 5)
    loss, stats = selector_loss(logits, single, torch.where(single, 1.0, math.nan), 0.0, 1.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
    broken = torch.full((3, 5), math.nan)
    broken[2, 4] = math.inf
    with pytest.raises(ValueError, match="source that ran"):
        selector_loss(logits, single, broken, 0.0, 1.0)


def test_baseline_weights():
    ce = torch.tensor([[2.0, 1.0, 3.0], [0.5, 0.7, 0.1]])
    available = torch.tensor([True, True, False])
    assert baseline_weights("none", ce).tolist() == [[0.0] * 3] * 2
    assert baseline_weights("all_uniform", ce, available).tolist() == [[0.5, 0.5, 0.0]] * 2
    assert baseline_weights("min_ce", ce, available).tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    assert baseline_weights("min_ce", ce).tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    # FuseLLM AvgCE: softmax over the rewards exp(-CE).
    a, b = math.exp(math.exp(-2.0)), math.exp(math.exp(-1.0))
    assert baseline_weights("avg_ce", ce, available)[0].tolist() == pytest.approx([a / (a + b), b / (a + b), 0.0])
    with pytest.raises(ValueError, match="baseline mode"):
        baseline_weights("max_ce", ce)
    with pytest.raises(ValueError, match="finite"):
        baseline_weights("min_ce", torch.tensor([[math.nan, 1.0]]))


def test_selection_network_modes():
    torch.manual_seed(0)
    scores = SelectionNetwork(3, features="scores", gate_temperature=0.5)
    nll = torch.tensor([[1.0, 2.0, 0.5]])
    torch.testing.assert_close(torch.softmax(scores(nll_per_byte=nll), -1), torch.softmax(-nll / 0.5, -1))
    with pytest.raises(ValueError, match="every source"):
        scores(nll_per_byte=torch.tensor([[1.0, math.nan, 0.5]]))

    net = SelectionNetwork(5, vocab_size=31, embed_dim=8, hidden_dim=16)
    ids = torch.randint(0, 1000, (2, 7))  # ids beyond vocab_size are hashed
    mask = torch.ones(2, 7, dtype=torch.long)
    padded_ids = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    out = net(ids, mask)
    assert out.shape == (2, 5)
    torch.testing.assert_close(net(padded_ids, padded_mask), out)
    with pytest.raises(ValueError, match="input_ids"):
        net(nll_per_byte=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="features"):
        SelectionNetwork(2, features="oracle")


def domain_batch(gen, batch):
    domains = torch.randint(0, SOURCES, (batch,), generator=gen)
    ids = torch.stack(
        [DOMAIN_TOKENS[d][torch.randint(0, len(DOMAIN_TOKENS[d]), (LENGTH,), generator=gen)] for d in domains.tolist()]
    )
    return ids, domains


def realised_scores(gen, domains, margin, best_source=None):
    """NLL per byte 1.5 ± 0.05, lowered by ``margin`` for the best source (default: the domain's)."""
    nll = 1.5 + 0.05 * torch.randn(len(domains), SOURCES, generator=gen)
    rows = torch.arange(len(domains))
    nll[rows, domains if best_source is None else best_source] -= margin
    return nll


def train_selector(seed, steps, beta, exploration, target_temperature, scores_for_step):
    """The trainer's selector loop; only the chosen sources are measured (others NaN)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = SelectionNetwork(SOURCES, vocab_size=VOCAB, embed_dim=16, hidden_dim=32)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(steps):
        ids, domains = domain_batch(gen, 32)
        logits = net(ids)
        chosen = select(torch.softmax(logits, -1).detach(), 0.15, 1, 2, exploration, generator=gen)
        measured = torch.where(chosen, scores_for_step(gen, step, domains), math.nan)
        loss, _ = selector_loss(logits, chosen, measured, beta, target_temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net, gen


def evaluate(net, gen):
    ids, domains = domain_batch(gen, 1000)
    with torch.no_grad():
        probs = torch.softmax(net(ids), -1)
    chosen = select(probs, 0.15, 1, 2, 0.0)
    share = chosen.sum(dim=0).float() / chosen.sum()
    return (probs.argmax(-1) == domains).float().mean().item(), share


def test_selector_learns_to_route_each_domain_to_its_source():
    start = time.perf_counter()
    net, gen = train_selector(
        seed=0, steps=150, beta=0.5, exploration=0.1, target_temperature=0.1,
        scores_for_step=lambda g, step, domains: realised_scores(g, domains, margin=0.5),
    )
    accuracy, _ = evaluate(net, gen)
    assert accuracy >= 0.9
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("seed", [0, 1])
def test_feedback_loss_prevents_collapse(seed):
    """Source 0 is slightly better everywhere for the first 150 steps, then each source is
    best on its own domain. Exploration is off, so a source is measured only if the gate
    chose it: without the feedback term the gate collapses onto source 0 in phase one and
    never measures the others again; with beta = 0.5 it keeps them and learns the routing."""

    def scores(gen, step, domains):
        if step < 150:
            return realised_scores(gen, domains, margin=0.1, best_source=0)
        return realised_scores(gen, domains, margin=0.5)

    outcomes = {}
    for beta in (0.0, 0.5):
        net, gen = train_selector(seed, 300, beta, 0.0, 0.05, scores)
        outcomes[beta] = evaluate(net, gen)
    accuracy, share = outcomes[0.0]
    assert share.max().item() >= 0.95
    accuracy, share = outcomes[0.5]
    assert share.max().item() < 0.95
    assert accuracy >= 0.9


def test_selector_regression_loss_hand_computed():
    predicted = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]], requires_grad=True)
    gate_logits = -predicted
    chosen = torch.tensor([[True, False, True], [False, True, False]])
    nll = torch.tensor([[1.5, math.nan, 2.0], [math.nan, 1.0, math.nan]])
    loss, stats = selector_regression_loss(predicted, gate_logits, chosen, nll, beta=0.0)
    expected = ((1.0 - 1.5) ** 2 + (3.0 - 2.0) ** 2 + (0.5 - 1.0) ** 2) / 3
    assert loss.item() == pytest.approx(expected)
    assert stats.measured_sequences.item() == 2
    loss.backward()
    assert predicted.grad[0, 1].item() == 0.0 and predicted.grad[1, 0].item() == 0.0
    with_feedback, stats = selector_regression_loss(predicted, gate_logits, chosen, nll, beta=0.5)
    importance = torch.softmax(gate_logits.detach(), 1).sum(0)
    cv2 = ((importance - importance.mean()) ** 2).mean() / importance.mean() ** 2
    assert with_feedback.item() == pytest.approx(expected + 0.5 * cv2.item())
    with pytest.raises(ValueError, match="NaN/inf"):
        selector_regression_loss(predicted, gate_logits, chosen, torch.full_like(nll, math.nan), 0.0)


def test_output_bias_starts_at_each_sources_mean_score():
    net = SelectionNetwork(3, vocab_size=31, embed_dim=8, hidden_dim=16)
    chosen = torch.tensor([[True, True, False], [True, False, False]])
    nll = torch.tensor([[1.0, 3.0, math.nan], [2.0, math.nan, math.nan]])
    net.init_output_bias(chosen, nll)
    # source 0: (1 + 2) / 2; source 1: 3; source 2 never ran: the mean of every score, 2.
    assert net.mlp[-1].bias.tolist() == pytest.approx([1.5, 3.0, 2.0])
    assert bool(net.output_initialised)
    out = net(torch.randint(0, 31, (4, 6)))
    torch.testing.assert_close(out, torch.tensor([[1.5, 3.0, 2.0]]).expand(4, -1))


def train_regression_selector(seed, steps, max_sources):
    """The regression objective in the trainer's loop, each sequence measured by its chosen sources only."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = SelectionNetwork(SOURCES, vocab_size=VOCAB, embed_dim=16, hidden_dim=32)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(steps):
        ids, domains = domain_batch(gen, 32)
        predicted = net(ids)
        gate_logits = -predicted / 0.1
        chosen = select(torch.softmax(gate_logits, -1).detach(), 0.15, 1, max_sources, 0.1, generator=gen)
        if step == 0:
            chosen = torch.ones_like(chosen)  # the measuring warm-up: every source once
        measured = torch.where(chosen, realised_scores(gen, domains, margin=0.5), math.nan)
        if not bool(net.output_initialised):
            net.init_output_bias(chosen, measured)
            predicted = net(ids)
            gate_logits = -predicted / 0.1
        loss, _ = selector_regression_loss(predicted, gate_logits, chosen, measured, beta=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids, domains = domain_batch(gen, 1000)
    with torch.no_grad():
        return (net(ids).argmin(-1) == domains).float().mean().item()


def test_regression_learns_the_routing_from_one_source_per_sequence():
    """One source per sequence leaves the ranking objective nothing to compare (no sequence has two
    scores); the regression objective learns every domain's best source from single scores."""
    assert train_regression_selector(seed=0, steps=150, max_sources=1) >= 0.9


@pytest.mark.parametrize("seed,correlation", [(0, 0.0), (1, 0.0), (2, 0.75), (3, 0.9)])
def test_ridge_selector_equals_the_closed_form_fit(seed, correlation):
    """Statistics added over two micro-batches (one summed as if from two identical ranks) give the
    generalised least squares fit that numpy computes on the stacked, whitened data, and its widths:
    the scores of one sequence have covariance (1 - kappa) I + kappa 11^T (kappa = correlation), so each sequence's
    rows are multiplied by a square root of its precision, and the ridge prior adds rows sqrt(lambda) I."""
    gen = torch.Generator().manual_seed(seed)
    sources, ridge = 3, 0.7
    selector = RidgeSelector(sources, vocab_size=VOCAB, embed_dim=5, ridge=ridge, correlation=correlation)
    ids = [torch.randint(0, VOCAB, (6, LENGTH), generator=gen) for _ in range(2)]
    masks = [torch.ones(6, LENGTH, dtype=torch.long) for _ in range(2)]
    masks[0][:2, 9:] = 0
    chosen = [torch.rand(6, sources, generator=gen) < 0.6 for _ in range(2)]
    chosen[0][:, 2] = False  # source 2 is measured in the second batch only
    scores = [torch.where(c, 1.0 + torch.rand(6, sources, generator=gen), math.nan) for c in chosen]
    selector.add_statistics(selector.statistics(ids[0], masks[0], chosen[0], scores[0]))
    selector(ids[0])  # a fit of the first batch alone, which the next statistics must replace
    selector.add_statistics(2 * selector.statistics(ids[1], masks[1], chosen[1], scores[1]))  # two ranks, same rows

    x = torch.cat([selector.features(ids[0], masks[0]), selector.features(ids[1], masks[1]), selector.features(ids[1], masks[1])]).numpy()
    c = torch.cat([chosen[0], chosen[1], chosen[1]]).numpy()
    y = torch.cat([scores[0], scores[1], scores[1]]).numpy()
    prior = np.nanmean(y[c])
    size = x.shape[1]
    design, target = [], []
    for b in range(len(x)):
        ran = np.flatnonzero(c[b])
        if not len(ran):
            continue
        covariance = (1 - correlation) * np.eye(len(ran)) + correlation * np.ones((len(ran), len(ran)))
        whiten = np.linalg.cholesky(np.linalg.inv(covariance)).T  # whiten^T whiten = precision
        rows = np.zeros((len(ran), sources * size))
        for row, s in enumerate(ran):
            rows[row, s * size:(s + 1) * size] = x[b]
        design.append(whiten @ rows)
        target.append(whiten @ (y[b, ran] - prior))
    design = np.vstack(design + [math.sqrt(ridge) * np.eye(sources * size)])
    target = np.concatenate(target + [np.zeros(sources * size)])
    theta = np.linalg.lstsq(design, target, rcond=None)[0].reshape(sources, size)
    covariance = np.linalg.inv(design.T @ design)
    new_ids = torch.randint(0, VOCAB, (4, LENGTH), generator=gen)
    new_x = selector.features(new_ids).numpy()
    predicted, width = selector(new_ids)
    for s in range(sources):
        np.testing.assert_allclose(predicted[:, s].numpy(), prior + new_x @ theta[s], rtol=1e-5, atol=1e-5)
        block = covariance[s * size:(s + 1) * size, s * size:(s + 1) * size]
        np.testing.assert_allclose(width[:, s].numpy(), np.sqrt(np.einsum("bi,ij,bj->b", new_x, block, new_x)), rtol=1e-5)
    # A selector that predicted from its empty statistics, then loaded these, predicts as this one does.
    loaded = RidgeSelector(sources, vocab_size=VOCAB, embed_dim=5, ridge=ridge, correlation=correlation)
    loaded(new_ids)
    loaded.load_state_dict(selector.state_dict())
    for mine, theirs in zip(loaded(new_ids), (predicted, width)):
        torch.testing.assert_close(mine, theirs)
    # Features: a constant 1, then a unit vector that ignores masked positions.
    features = selector.features(ids[0], masks[0])
    assert features[:, 0].tolist() == [1.0] * 6
    torch.testing.assert_close(features[:, 1:].norm(dim=1), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(features[0], selector.features(ids[0][:1, :9])[0])


def test_ridge_selector_rejects_foreign_statistics_and_bad_sizes():
    selector = RidgeSelector(2, vocab_size=VOCAB, embed_dim=3)
    size = (2 * 4) ** 2 + 2 * 4 + 2 * 4 + 2  # gram, moment, feature sum, score total
    selector.add_statistics(torch.zeros(size))
    for wrong in (size - 1, size + 1):
        with pytest.raises(ValueError, match="not this selector's"):
            selector.add_statistics(torch.zeros(wrong))
    with pytest.raises(ValueError, match="ridge"):
        RidgeSelector(2, ridge=0.0)
    for wrong in (-0.1, 1.0):
        with pytest.raises(ValueError, match="correlation"):
            RidgeSelector(2, correlation=wrong)


def fit_linucb(gen, selector, scores, steps, optimism, per_sequence):
    """The trainer's loop for LinUCB on batches of 32 domain sequences: a measuring step that asks every
    source, then ``per_sequence`` sources per sequence by the optimistic prediction; ``scores(domains)``
    gives every source's score on each sequence, of which the selector learns the chosen ones."""
    for step in range(steps):
        ids, domains = domain_batch(gen, 32)
        predicted, width = selector(ids)
        if step == 0:
            chosen = torch.ones(32, SOURCES, dtype=torch.bool)  # the measuring warm-up
        else:
            chosen = select(torch.softmax(-(predicted - optimism * width) / 0.1, -1), 0.5, per_sequence, per_sequence, 0.0)
        measured = torch.where(chosen, scores(domains), math.nan)
        selector.add_statistics(selector.statistics(ids, torch.ones_like(ids), chosen, measured))


def train_linucb(seed, steps, optimism):
    """LinUCB in the trainer's loop, one source per sequence, no random exploration. Source 0 is a
    generalist (1.0 everywhere); source d >= 1 scores 0.8 on domain d and 1.6 elsewhere. Returns the
    share of fresh sequences routed to their domain's best source (domain 0: the generalist)."""
    gen = torch.Generator().manual_seed(seed)
    selector = RidgeSelector(SOURCES, vocab_size=VOCAB, embed_dim=64)

    def scores(domains):
        nll = 1.6 + 0.05 * torch.randn(len(domains), SOURCES, generator=gen)
        nll[:, 0] = 1.0 + 0.05 * torch.randn(len(domains), generator=gen)
        rows = torch.arange(len(domains))
        specialist = domains > 0
        nll[rows[specialist], domains[specialist]] = 0.8 + 0.05 * torch.randn(int(specialist.sum()), generator=gen)
        return nll

    fit_linucb(gen, selector, scores, steps, optimism, per_sequence=1)
    ids, domains = domain_batch(gen, 1000)
    best = torch.where(domains > 0, domains, 0)
    return (selector(ids)[0].argmin(-1) == best).float().mean().item()


def test_linucb_finds_the_specialists_a_greedy_choice_never_measures():
    """After one measuring step every specialist's mean (1.4) is far above the generalist's (1.0):
    chosen greedily (optimism 0) a specialist may never be asked on its domain again, and is then
    never found; with optimism its uncertainty on its own domain gets it asked there, and it wins."""
    greedy = [train_linucb(seed, steps=60, optimism=0.0) for seed in range(3)]
    optimistic = [train_linucb(seed, steps=60, optimism=0.3) for seed in range(3)]
    assert min(greedy) < 0.9, greedy
    assert min(optimistic) >= 0.95, optimistic


def train_linucb_shared(seed, correlation, steps=20):
    """LinUCB in the trainer's loop, two sources per sequence. Every sequence has a difficulty that
    all sources share (standard deviation 0.5) and each source its own error (0.05); the domain's
    specialist is 0.1 better. Returns the share of fresh sequences routed to their specialist."""
    gen = torch.Generator().manual_seed(seed)
    selector = RidgeSelector(SOURCES, vocab_size=VOCAB, embed_dim=64, correlation=correlation)

    def scores(domains):
        nll = 1.5 + 0.5 * torch.randn(len(domains), 1, generator=gen) + 0.05 * torch.randn(len(domains), SOURCES, generator=gen)
        nll[torch.arange(len(domains)), domains] -= 0.1
        return nll

    fit_linucb(gen, selector, scores, steps, optimism=0.3, per_sequence=2)
    ids, domains = domain_batch(gen, 1000)
    return (selector(ids)[0].argmin(-1) == domains).float().mean().item()


def test_linucb_with_correlated_scores_compares_the_sources_of_one_sequence():
    """The difficulty of a sequence moves all its scores together: regressed independently
    (correlation 0) each source's estimate carries that noise (0.5) and the 0.1 advantage is lost in
    it; with the correlation in the model (0.5^2 / (0.5^2 + 0.05^2) = 0.99) the scores of one
    sequence are compared with each other, and the specialists are found."""
    independent = [train_linucb_shared(seed, 0.0) for seed in range(3)]
    shared = [train_linucb_shared(seed, 0.99) for seed in range(3)]
    assert max(independent) < 0.7, independent
    assert min(shared) >= 0.95, shared
