"""Source selection: the gate network, the selection rule, the selector loss and baselines.

Notation: ``b`` sequence of the micro-batch (B of them), ``s`` source (S of them),
``g[b, s] = softmax_s(u[b, :])`` the gate probabilities from the gate logits ``u``,
``n[b, s]`` source s's realised negative log-likelihood of sequence b's gold text per UTF-8
byte (comparable across tokenizers), ``C_b`` the set of sources that ran for sequence b.

Gate (``SelectionNetwork``)
    ``ids`` (the ``predictive`` policy): features that exist before any source runs. The target ids are hashed
    into the selector's own embedding table (``id mod vocab_size``), mean-pooled over the
    attention mask, layer-normalised and mapped by a two-layer MLP to ``u[b, :]``.
    ``scores`` (the ``scores`` policy, the paper's gate over realised scores; needs every source's score)::

        u[b, :] = A (-n[b, :] / T_gate) + c        (A = I, c = 0 at init, both learnt)

    so at initialisation ``g[b, :] = softmax(-n[b, :] / T_gate)``.

Selection (``select``)
    Per sequence, sources are ranked by ``g`` (ties: lower source index first); the source of
    rank r (0-based) is chosen when it is available and
    ``(g > tau and r < max_sources) or r < min_sources``. With probability
    ``exploration_rate`` one more available, unchosen source (uniformly at random) is added,
    so a sequence may get ``max_sources + 1`` sources.
    With ``families`` (``selector.distinct_tokenizers``: sources that share a tokenizer are one
    family), the ranking puts every source whose family already has a better-ranked available
    source after all the others, so the chosen come from distinct families where the pool has
    enough of them: two sources with one tokenizer answer at the same positions from the same
    vocabulary, and the second adds less than a source of another family.

Selector objectives
    ``ranking`` (``selector_loss``, the paper's), ``regression`` (``selector_regression_loss``), or
    ``linucb`` (``RidgeSelector``: no network, no loss).

Regression (``selector_regression_loss``)
    The ``ids`` network's outputs are read as predicted scores ``m[b, s]`` (bits of source s per
    byte of sequence b) and the gate is ``u[b, :] = -m[b, :] / T_gate``, so that the rule prefers
    the sources expected to do best. Every source that ran gives a target, also for sequences
    that only one source answered::

        mse  = mean_{(b, s) : s in C_b} (m[b, s] - n[b, s])^2
        loss = mse + beta * CV^2          (CV^2 of the gate's importance, as below)

    The output bias starts at each source's mean measured score (``init_output_bias``), so the
    network only has to learn how sequences differ, not the scale of the scores.

LinUCB (``RidgeSelector``, ``selector.objective: linucb``)
    A contextual bandit instead of a network: ``x_b`` = (1, the unit-length mean over the mask of
    fixed random rows ``E[id mod V]``, ``E ~ N(0, 1)``), and one linear model ``n[b, s] = nbar +
    x_b . theta_s + e[b, s]`` for all sources, in which the errors of one sequence's scores have the
    covariance ``(1 - kappa) I + kappa 11^T`` (``kappa``: ``selector.correlation``; a hard sequence is
    hard for every source). Its generalised least squares fit with a ridge prior, over every score::

        W_b = inverse of that covariance over C_b = (diag(c_b) - rho_b c_b c_b^T) / (1 - kappa),
              rho_b = kappa / (1 - kappa + |C_b| kappa)        (c_b: the indicator of C_b)
        G = lambda I + sum_b W_b (x) x_b x_b^T,   M = sum_b (W_b n_b) (x) x_b,   F = sum_b (W_b c_b) (x) x_b
        theta = G^{-1} (M - nbar F)                 (nbar = mean of every score of every source)
        m[b, s] = nbar + x_b . theta_s,   w[b, s] = sqrt((e_s (x) x_b)^T G^{-1} (e_s (x) x_b))

    With ``kappa = 0``, ``G`` is block diagonal and every source is its own ridge regression; as
    ``kappa`` grows the fit rests on how the sources of one sequence differ, which the sequence's
    difficulty does not blur. A single score keeps weight 1 either way. A source predicts the mean
    score until its own scores say otherwise, and ``w`` shrinks where it was measured. Training
    chooses by the optimistic ``m - alpha w`` (``selector.optimism``): a source that was rarely
    measured on text like this one gets asked, and is then kept or dropped by what it scored, so a
    specialist that the other sources' scores hide is found. The weights among the chosen and the
    held-out routing read ``m`` alone (gate ``-m / T_gate``). Every score that arrived updates the
    statistics exactly (summed over the trainer ranks).

Selector loss (``selector_loss``)
    Only the sources that ran have a realised score, so the prediction target is restricted
    to them. For every sequence with ``|C_b| >= 2``::

        p[b, s] = exp(u[b, s]) / sum_{s' in C_b} exp(u[b, s'])          (gate restricted to C_b)
        r[b, s] = exp(-n[b, s] / T) / sum_{s' in C_b} exp(-n[b, s'] / T)
        CE_b    = -sum_{s in C_b} r[b, s] log p[b, s]

    Sequences with fewer than two sources carry no information about which source is best
    and are left out. With ``E = {b : |C_b| >= 2}``, the feedback (load-balancing) term of the
    paper is the squared coefficient of variation of the source importance::

        I_s    = sum_b g[b, s]                              (full gate, all B sequences)
        CV^2   = Var(I) / Mean(I)^2,  Var(I) = (1/S) sum_s (I_s - Mean(I))^2
        loss   = (1/|E|) sum_{b in E} CE_b + beta * CV^2     (first term 0 when E is empty)

    ``Var`` is the population variance: the S sources are the whole population, not a sample
    of it, so CV^2 = 0 exactly at balance, S - 1 at total collapse, and it is defined for S = 1
    (the unbiased estimator would divide by S - 1 = 0). ``Mean(I) = B / S`` is never 0.

Baselines (``baseline_weights``), from per-sequence source cross-entropies ``e[b, s]``
(per token as in FuseLLM, or per byte) over the available sources ``A``::

    none         w[b, s] = 0                                        (plain LM training)
    all_uniform  w[b, s] = 1 / |A|
    min_ce       w[b, s] = 1 if s = argmin_{s' in A} e[b, s'] else 0   (FuseLLM MinCE)
    avg_ce       w[b, s] = softmax_{s in A}(exp(-e[b, s]))             (FuseLLM AvgCE)

``avg_ce`` reproduces FuseLLM's released trainer (``distill_weighted_as_gt``): each source's
reward is ``1 / exp(CE)`` and the weights are the softmax of the rewards, not ``softmax(-CE)``.
Rewards lie in (0, 1], so these weights are close to uniform (ratios at most e).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GATE_FEATURES = ("ids", "scores")
BASELINE_MODES = ("all_uniform", "avg_ce", "min_ce", "none")
EXPLORATION_SCHEDULES = ("constant", "linear", "exponential")


class SelectionNetwork(nn.Module):
    """Gate over S sources; persistent, trained by the trainer with its own optimizer.

    Args:
        num_sources: S >= 1.
        features: ``"ids"`` (from target ids, before any source runs) or ``"scores"`` (from realised scores).
        vocab_size: rows of the selector's own embedding table (ids are hashed modulo it, so
            it may be much smaller than the target vocabulary).
        embed_dim: embedding width (``ids``).
        hidden_dim: MLP hidden width (``ids``).
        gate_temperature: ``T_gate`` of the scores gate.

    Raises:
        ValueError: unknown features or non-positive sizes / temperature.
    """

    def __init__(
        self,
        num_sources: int,
        features: str = "ids",
        vocab_size: int = 8192,
        embed_dim: int = 64,
        hidden_dim: int = 128,
        gate_temperature: float = 1.0,
    ):
        super().__init__()
        if features not in GATE_FEATURES:
            raise ValueError(f"selector features={features!r} are unknown; use one of {GATE_FEATURES}")
        for name, value in (("num_sources", num_sources), ("vocab_size", vocab_size),
                            ("embed_dim", embed_dim), ("hidden_dim", hidden_dim)):
            if value < 1:
                raise ValueError(f"selector {name}={value} must be >= 1")
        if not gate_temperature > 0:
            raise ValueError(f"selector gate_temperature={gate_temperature} must be > 0")
        self.num_sources = num_sources
        self.features = features
        self.vocab_size = vocab_size
        self.gate_temperature = gate_temperature
        if features == "ids":
            self.embedding = nn.Embedding(vocab_size, embed_dim)
            self.mlp = nn.Sequential(
                nn.LayerNorm(embed_dim),
                nn.Linear(embed_dim, hidden_dim),
                nn.GELU(),
                nn.Linear(hidden_dim, num_sources),
            )
            # Set by init_output_bias (regression objective); checkpointed with the weights.
            self.register_buffer("output_initialised", torch.tensor(False))
        else:
            self.score_map = nn.Linear(num_sources, num_sources)
            with torch.no_grad():
                self.score_map.weight.copy_(torch.eye(num_sources))
                self.score_map.bias.zero_()

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        nll_per_byte: Tensor | None = None,
    ) -> Tensor:
        """Gate logits ``u[B, S]`` (``softmax(u, -1)`` gives the gate probabilities).

        Args:
            input_ids: ``[B, L]`` target ids (``ids`` features).
            attention_mask: ``[B, L]`` 1 for real tokens (``ids`` features; default all ones).
            nll_per_byte: ``[B, S]`` realised score of every source (``scores`` features).

        Raises:
            ValueError: the input the features need is missing, has the wrong shape, or (``scores``)
                contains NaN/inf.
        """
        if self.features == "ids":
            if input_ids is None or input_ids.dim() != 2:
                raise ValueError("predictive selector needs input_ids of shape [B, L]")
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            if mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(input_ids.shape)}")
            embedded = self.embedding(input_ids.long().remainder(self.vocab_size))
            weights = mask.to(embedded.dtype).unsqueeze(-1)
            pooled = (embedded * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
            return self.mlp(pooled)
        if nll_per_byte is None or nll_per_byte.dim() != 2 or nll_per_byte.shape[1] != self.num_sources:
            raise ValueError(f"scores selector needs nll_per_byte of shape [B, {self.num_sources}]")
        if not bool(torch.isfinite(nll_per_byte).all()):
            raise ValueError(
                "scores selector got NaN/inf in nll_per_byte: the scores gate needs the score of every source "
                "(run all sources or read offline labels)"
            )
        return self.score_map(-nll_per_byte.float() / self.gate_temperature)

    @torch.no_grad()
    def init_output_bias(self, chosen: Tensor, nll_per_byte: Tensor) -> None:
        """Set the ``ids`` MLP's output bias to each source's mean score where it ran (the mean over
        every measured score for a source that did not run), and its output weights to zero."""
        chosen = chosen.bool()
        if not bool(chosen.any()):
            raise ValueError("init_output_bias needs at least one measured score")
        scores = torch.where(chosen, nll_per_byte.float(), 0.0)
        overall = scores.sum() / chosen.sum()
        per_source = scores.sum(0) / chosen.sum(0).clamp_min(1)
        output = self.mlp[-1]
        output.bias.copy_(torch.where(chosen.any(0), per_source, overall).to(output.bias.device))
        output.weight.zero_()
        self.output_initialised.fill_(True)


class RidgeSelector(nn.Module):
    """The ``linucb`` gate: one ridge regression of every source's bits per byte on fixed features of
    the target ids, in which the scores of one sequence are correlated (its difficulty moves them
    together), with a confidence width for optimism (equations in the module docstring).

    It is fitted in closed form from sufficient statistics (buffers, checkpointed), never by
    gradient; the features are a fixed random projection (seed ``FEATURE_SEED``, the same in every
    run and on every rank), so they need no storing.

    Args:
        num_sources: S >= 1.
        vocab_size: rows of the feature table (ids are hashed modulo it).
        embed_dim: D, the width of the projection (features have D + 1 entries: a constant 1 first).
        ridge: lambda > 0, the prior's strength in observations of a unit feature vector.
        correlation: kappa in [0, 1), the correlation of two sources' scores on one sequence (what its
            difficulty moves in both; 0: every score is independent).
    """

    FEATURE_SEED = 0

    def __init__(self, num_sources: int, vocab_size: int = 8192, embed_dim: int = 64, ridge: float = 1.0,
                 correlation: float = 0.0):
        super().__init__()
        for name, value in (("num_sources", num_sources), ("vocab_size", vocab_size), ("embed_dim", embed_dim)):
            if value < 1:
                raise ValueError(f"selector {name}={value} must be >= 1")
        if not ridge > 0:
            raise ValueError(f"selector ridge={ridge} must be > 0")
        if not 0 <= correlation < 1:
            raise ValueError(f"selector correlation={correlation} must be in [0, 1)")
        self.num_sources, self.vocab_size, self.correlation = num_sources, vocab_size, correlation
        table = torch.randn(vocab_size, embed_dim, generator=torch.Generator().manual_seed(self.FEATURE_SEED))
        self.register_buffer("table", table, persistent=False)
        size = num_sources * (embed_dim + 1)
        # G = lambda I + sum W (x) x x^T (rows and columns: source-major), M = sum (W y) (x) x,
        # F = sum (W 1) (x) x, and the sum and count of every score: float64, so that long runs add up
        # exactly enough.
        self.register_buffer("gram", ridge * torch.eye(size, dtype=torch.float64))
        self.register_buffer("moment", torch.zeros(num_sources, embed_dim + 1, dtype=torch.float64))
        self.register_buffer("feature_sum", torch.zeros(num_sources, embed_dim + 1, dtype=torch.float64))
        self.register_buffer("score_total", torch.zeros(2, dtype=torch.float64))  # [sum of y, count]
        self._fit = None  # (prior, theta, width blocks) of the current statistics; None: to solve

    def _apply(self, fn, *args, **kwargs):
        self._fit = None  # moved or cast: solve again from the buffers
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._fit = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _solve(self) -> tuple[Tensor, Tensor, Tensor]:
        """The fit of the current statistics (one inversion of G, kept until they change)."""
        if self._fit is None:
            total, count = self.score_total
            prior = total / count if count > 0 else total
            sources, size = self.moment.shape
            inverse = torch.linalg.inv(self.gram)
            theta = (inverse @ (self.moment - prior * self.feature_sum).flatten()).view(sources, size)
            blocks = inverse.view(sources, size, sources, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [S, D+1, D+1]
            self._fit = (prior, theta, blocks)
        return self._fit

    def features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``[B, D + 1]`` float64: 1, then the unit-length mean of the ids' table rows over the mask."""
        if input_ids.dim() != 2:
            raise ValueError("linucb selector needs input_ids of shape [B, L]")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(input_ids.shape)}")
        embedded = self.table[input_ids.long().remainder(self.vocab_size)].double()
        pooled = (embedded * mask.double().unsqueeze(-1)).sum(dim=1)
        pooled = pooled / pooled.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return torch.cat([torch.ones(pooled.shape[0], 1, dtype=pooled.dtype, device=pooled.device), pooled], dim=1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(m, w)``, each ``[B, S]`` float32: the predicted bits per byte and the confidence width."""
        x = self.features(input_ids, attention_mask)
        prior, theta, blocks = self._solve()
        predicted = prior + x @ theta.T
        width = torch.einsum("bi,sij,bj->bs", x, blocks, x).clamp_min(0.0).sqrt()
        return predicted.float(), width.float()

    def statistics(self, input_ids: Tensor, attention_mask: Tensor, chosen: Tensor, nll_per_byte: Tensor) -> Tensor:
        """The increments of every statistic from one micro-batch's scores where ``chosen``, as one flat
        float64 tensor (``add_statistics`` takes it; ranks sum theirs first)."""
        x = self.features(input_ids, attention_mask)
        chosen = chosen.to(x.device, torch.float64)
        y = torch.where(chosen.bool(), nll_per_byte.to(x.device, torch.float64), 0.0)
        # W_b = (diag(c) - rho c c^T) / (1 - kappa), rho = kappa / (1 - kappa + |C_b| kappa): the inverse of
        # the covariance (1 - kappa) I + kappa 11^T of the scores of one sequence.
        kappa = self.correlation
        rho = kappa / (1.0 - kappa + chosen.sum(1) * kappa)
        weight = (torch.diag_embed(chosen) - rho[:, None, None] * chosen[:, :, None] * chosen[:, None, :]) / (1.0 - kappa)
        gram = torch.einsum("bst,bi,bj->sitj", weight, x, x).reshape(self.gram.shape)
        pieces = (gram, torch.einsum("bst,bt,bi->si", weight, y, x), torch.einsum("bst,bt,bi->si", weight, chosen, x),
                  torch.stack([y.sum(), chosen.sum()]))
        return torch.cat([piece.flatten() for piece in pieces])

    def add_statistics(self, increments: Tensor) -> None:
        """Add what ``statistics`` returned (summed over ranks)."""
        buffers = (self.gram, self.moment, self.feature_sum, self.score_total)
        expected = sum(buffer.numel() for buffer in buffers)
        if increments.numel() != expected:
            raise ValueError(f"{increments.numel()} selector statistics, not this selector's {expected}")
        increments = increments.to(self.gram.device, torch.float64)
        self._fit = None
        for buffer in buffers:
            part, increments = increments[:buffer.numel()], increments[buffer.numel():]
            buffer += part.view_as(buffer)


def select(
    probs: Tensor,
    tau: float,
    min_sources: int,
    max_sources: int,
    exploration_rate: float,
    generator: torch.Generator | None = None,
    available_mask: Tensor | None = None,
    families: Tensor | None = None,
) -> Tensor:
    """Choose the sources that run for each sequence (rule in the module docstring).

    Args:
        probs: ``[B, S]`` gate probabilities.
        tau: probability threshold; sources with ``probs > tau`` are kept.
        min_sources: at least this many (the top ones), capped at the available count; >= 1.
        max_sources: at most this many before exploration; >= ``min_sources``.
        exploration_rate: probability per sequence of adding one unchosen available source.
        generator: RNG for exploration, on ``probs``' device (one per rank for reproducible runs).
        available_mask: ``[S]`` bool, false for sources that are down; default all available.
        families: ``[S]`` integer family of each source (equal: same tokenizer); default none, so
            every source ranks by ``probs`` alone.

    Returns:
        ``[B, S]`` bool chosen mask; never chooses an unavailable source.

    Raises:
        ValueError: bad shapes or bounds, or no source available.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must be [B, S], got shape {tuple(probs.shape)}")
    batch, sources = probs.shape
    if not 1 <= min_sources <= max_sources:
        raise ValueError(f"need 1 <= min_sources ({min_sources}) <= max_sources ({max_sources})")
    if not 0.0 <= exploration_rate <= 1.0:
        raise ValueError(f"exploration_rate={exploration_rate} must be in [0, 1]")
    available = _available(available_mask, sources, probs.device)
    if not bool(available.any()):
        raise ValueError("no source is available; at least one source must be up to select from")

    if families is not None and families.shape != (sources,):
        raise ValueError(f"families must be [S] = [{sources}], got shape {tuple(families.shape)}")
    # Unavailable sources rank below every real probability and are masked out at the end.
    ranked_probs = torch.where(available, probs.detach().float(), -3.0)
    rank = _ranks(ranked_probs)
    if families is not None:
        # A source whose family has a better-ranked available source ranks after the first of every family.
        same = families.to(probs.device)[:, None] == families.to(probs.device)[None, :]  # [S, S]
        second = (same & available[None, :] & (rank[:, None, :] < rank[:, :, None])).any(-1)  # [B, S]
        rank = _ranks(ranked_probs - 2.0 * (second & available))
    chosen = ((ranked_probs > tau) & (rank < max_sources)) | (rank < min_sources)
    chosen &= available

    if exploration_rate > 0:
        explore = torch.rand(batch, generator=generator, device=probs.device) < exploration_rate
        candidates = available & ~chosen
        scores = torch.rand(batch, sources, generator=generator, device=probs.device)
        pick = torch.where(candidates, scores, -1.0).argmax(dim=1)
        add = explore & candidates.any(dim=1)
        chosen[add, pick[add]] = True
    return chosen


def _ranks(keys: Tensor) -> Tensor:
    """``[B, S]`` 0-based rank of every source in its row by ``keys``, highest first (ties: lower index first)."""
    order = keys.argsort(dim=1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(1, order, torch.arange(keys.shape[1], device=keys.device).expand(keys.shape[0], -1))


def exploration_rate_at(step: int, start: float, end: float, decay_steps: int, schedule: str = "linear") -> float:
    """Exploration rate at an optimizer step, decaying from ``start`` to ``end``.

    With ``f = min(step / decay_steps, 1)``:
    ``constant``: ``start``; ``linear``: ``start + (end - start) * f``;
    ``exponential`` (geometric interpolation): ``start * (end / start) ** f``.
    After ``decay_steps`` the rate stays at ``end``.

    Raises:
        ValueError: unknown schedule, rates outside [0, 1], ``decay_steps < 1``, or an
            exponential schedule with a zero rate (use linear to decay to 0).
    """
    if schedule not in EXPLORATION_SCHEDULES:
        raise ValueError(f"exploration schedule={schedule!r} is unknown; use one of {EXPLORATION_SCHEDULES}")
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise ValueError(f"exploration rates start={start}, end={end} must be in [0, 1]")
    if decay_steps < 1:
        raise ValueError(f"exploration decay_steps={decay_steps} must be >= 1")
    fraction = min(max(step, 0) / decay_steps, 1.0)
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * fraction
    if start <= 0 or end <= 0:
        raise ValueError("exponential exploration decay needs start > 0 and end > 0; use 'linear' to reach 0")
    return start * math.exp(fraction * math.log(end / start))


@dataclass(frozen=True)
class SelectorStats:
    """Detached parts of the selector loss, for logging.

    Attributes:
        ce: 0-dim, mean restricted cross-entropy over sequences with >= 2 sources (0 if none).
        cv2: 0-dim, squared coefficient of variation of the importance.
        importance: ``[S]``, ``I_s = sum_b g[b, s]``.
        measured_sequences: 0-dim int64, sequences with >= 2 sources (the CE term's count).
    """

    ce: Tensor
    cv2: Tensor
    importance: Tensor
    measured_sequences: Tensor


def feedback_term(gate_logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(I, CV^2)``: the importance ``I_s = sum_b g[b, s]`` and its squared coefficient of variation."""
    importance = torch.softmax(gate_logits.float(), dim=1).sum(dim=0)
    return importance, importance.var(unbiased=False) / importance.mean().square()


def selector_loss(
    gate_logits: Tensor,
    chosen: Tensor,
    realised_nll_per_byte: Tensor,
    beta: float,
    target_temperature: float,
) -> tuple[Tensor, SelectorStats]:
    """Restricted cross-entropy to the realised ranking + ``beta`` * CV^2 (module docstring).

    Args:
        gate_logits: ``[B, S]`` gate logits ``u`` (differentiable).
        chosen: ``[B, S]`` bool, the sources that ran.
        realised_nll_per_byte: ``[B, S]`` scores; read only where ``chosen`` (may be NaN elsewhere).
        beta: weight of the feedback term, >= 0.
        target_temperature: ``T`` > 0 of the target ``softmax(-n / T)``.

    Returns:
        ``(loss, stats)`` with a 0-dim float32 loss.

    Raises:
        ValueError: shape mismatch, ``beta < 0``, ``target_temperature <= 0``, or a non-finite
            score for a source that ran.
    """
    if gate_logits.dim() != 2 or chosen.shape != gate_logits.shape or realised_nll_per_byte.shape != gate_logits.shape:
        raise ValueError(
            f"gate_logits {tuple(gate_logits.shape)}, chosen {tuple(chosen.shape)} and realised_nll_per_byte "
            f"{tuple(realised_nll_per_byte.shape)} must all be [B, S]"
        )
    if beta < 0:
        raise ValueError(f"selector beta={beta} must be >= 0")
    if not target_temperature > 0:
        raise ValueError(f"selector target_temperature={target_temperature} must be > 0")
    chosen = chosen.bool()
    nll = realised_nll_per_byte.detach().float()
    if bool((chosen & ~torch.isfinite(nll)).any()):
        raise ValueError("realised_nll_per_byte is NaN/inf for a source that ran; every chosen source needs a score")

    logits = gate_logits.float()
    measured = chosen.sum(dim=1) >= 2
    restricted_log_p = torch.log_softmax(logits.masked_fill(~chosen, -math.inf), dim=1)
    target = torch.softmax((-nll / target_temperature).masked_fill(~chosen, -math.inf), dim=1)
    # Rows with one or no source give NaN/-inf above; they are excluded before summing.
    per_sequence = -(torch.where(chosen, target * restricted_log_p, 0.0)).sum(dim=1)
    count = measured.sum()
    ce = torch.where(measured, per_sequence, 0.0).sum() / count.clamp_min(1)

    importance, cv2 = feedback_term(logits)
    loss = ce + beta * cv2
    stats = SelectorStats(ce=ce.detach(), cv2=cv2.detach(), importance=importance.detach(), measured_sequences=count)
    return loss, stats


def selector_regression_loss(
    predicted: Tensor,
    gate_logits: Tensor,
    chosen: Tensor,
    realised_nll_per_byte: Tensor,
    beta: float,
) -> tuple[Tensor, SelectorStats]:
    """Squared error of the predicted scores where a source ran + ``beta`` * CV^2 (module docstring).

    Args:
        predicted: ``[B, S]`` predicted bits per byte ``m`` (differentiable).
        gate_logits: ``[B, S]`` the gate logits derived from them (for the importance term).
        chosen: ``[B, S]`` bool, the sources that ran.
        realised_nll_per_byte: ``[B, S]`` scores; read only where ``chosen``.
        beta: weight of the feedback term, >= 0.

    Returns:
        ``(loss, stats)``; ``stats.ce`` holds the mean squared error, ``measured_sequences`` the
        sequences with at least one score.

    Raises:
        ValueError: shape mismatch, ``beta < 0`` or a non-finite score for a source that ran.
    """
    if predicted.dim() != 2 or gate_logits.shape != predicted.shape or chosen.shape != predicted.shape \
            or realised_nll_per_byte.shape != predicted.shape:
        raise ValueError(
            f"predicted {tuple(predicted.shape)}, gate_logits {tuple(gate_logits.shape)}, chosen {tuple(chosen.shape)} "
            f"and realised_nll_per_byte {tuple(realised_nll_per_byte.shape)} must all be [B, S]"
        )
    if beta < 0:
        raise ValueError(f"selector beta={beta} must be >= 0")
    chosen = chosen.bool()
    nll = realised_nll_per_byte.detach().float()
    if bool((chosen & ~torch.isfinite(nll)).any()):
        raise ValueError("realised_nll_per_byte is NaN/inf for a source that ran; every chosen source needs a score")
    error = torch.where(chosen, predicted.float() - torch.where(chosen, nll, 0.0), 0.0)
    mse = error.square().sum() / chosen.sum().clamp_min(1)
    importance, cv2 = feedback_term(gate_logits)
    loss = mse + beta * cv2
    stats = SelectorStats(ce=mse.detach(), cv2=cv2.detach(), importance=importance.detach(),
                          measured_sequences=chosen.any(dim=1).sum())
    return loss, stats


def baseline_weights(mode: str, source_ce: Tensor, available_mask: Tensor | None = None) -> Tensor:
    """Sequence weights of the trainer-side baseline policies (equations in the module docstring).

    Args:
        mode: one of ``all_uniform``, ``avg_ce``, ``min_ce``, ``none``.
        source_ce: ``[B, S]`` per-sequence cross-entropy of each source (per token or per
            byte); only read for ``avg_ce`` / ``min_ce`` and only for available sources.
        available_mask: ``[S]`` bool; default all available.

    Returns:
        ``[B, S]`` float32 weights, summing to 1 per sequence (all zero for ``none``), zero for
        unavailable sources. Ties in ``min_ce`` go to the lowest source index.

    Raises:
        ValueError: unknown mode, bad shapes, no available source, or a non-finite score of an
            available source when the mode reads scores.
    """
    if mode not in BASELINE_MODES:
        raise ValueError(f"baseline mode={mode!r} is unknown; use one of {BASELINE_MODES}")
    if source_ce.dim() != 2:
        raise ValueError(f"source_ce must be [B, S], got shape {tuple(source_ce.shape)}")
    batch, sources = source_ce.shape
    available = _available(available_mask, sources, source_ce.device)
    if mode == "none":
        return torch.zeros(batch, sources, device=source_ce.device)
    if not bool(available.any()):
        raise ValueError(f"baseline mode={mode!r} needs at least one available source")
    if mode == "all_uniform":
        return (available.float() / available.sum()).expand(batch, -1).clone()

    ce = source_ce.detach().float()
    if bool((available & ~torch.isfinite(ce)).any()):
        raise ValueError(f"baseline mode={mode!r} needs a finite score for every available source")
    if mode == "min_ce":
        best = torch.where(available, ce, math.inf).argmin(dim=1)
        return F.one_hot(best, sources).float()
    reward = torch.where(available, torch.exp(-ce), -math.inf)
    return torch.softmax(reward, dim=1)


def _available(available_mask: Tensor | None, sources: int, device: torch.device) -> Tensor:
    """``[S]`` bool availability (default: every source up); raises ValueError on a wrong shape."""
    if available_mask is None:
        return torch.ones(sources, dtype=torch.bool, device=device)
    available = available_mask.to(device=device, dtype=torch.bool)
    if available.shape != (sources,):
        raise ValueError(f"available_mask has shape {tuple(available.shape)}, expected [{sources}]")
    return available
