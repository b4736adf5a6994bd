"""Fusion policies: which sources run for each sequence, how much each answer weighs, what is learnt.

A policy answers three questions in the order the training step asks them:

``choose(batch, available, step)``
    before any source runs: ``[B, S]`` bool, the sources to ask for each sequence.
``weigh(batch, answers, ran)``
    once the answers arrived (``ran``: the rows each source did answer): ``[B, S]`` sequence
    weights for :func:`fusion.fusion_weights.fuse_soft_labels`, zero where a source did not run.
``learn(batch, answers, ran)``
    update whatever the policy learns from what it saw (a no-op for the fixed baselines).

One class per ``fusion.mode``; ``POLICIES`` maps the mode names of ``fusion.config.FUSION_MODES``
to them. The selector network and its optimizer belong to the policies that have one, and are
checkpointed through ``state_dict``. Equations of the gates, the selection rule and the baselines
are in :mod:`fusion.selection` and :mod:`fusion.fusion_weights`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar, Iterable, Sequence

import torch
from torch import Tensor

from fusion.config import Config, read_ground_truth
from fusion.fusion_weights import chosen_weights, sharpen_weights
from fusion.selection import (RidgeSelector, SelectionNetwork, baseline_weights, exploration_rate_at, select,
                              selector_loss, selector_regression_loss)
from fusion.sources.answer import SparseSoftLabels

# Stands in for the score of a row a source did not answer (masked out of the weights anyway).
UNANSWERED_NLL = 1e9


def _scores(answers: Sequence[SparseSoftLabels], field: str) -> Tensor:
    """``[B, S]`` per-sequence scores of every source (NaN where it did not answer)."""
    return torch.stack([getattr(answer, field) for answer in answers], dim=1)


def _entropy(gate_logits: Tensor) -> float:
    """The gate's mean entropy in nats (log S: a uniform gate)."""
    gate = gate_logits.detach().log_softmax(-1)
    return float(-(gate.exp() * gate).sum(-1).mean())


class FusionPolicy:
    """The fixed policy every baseline shares: ask every available source, learn nothing.

    Subclasses override ``_weigh`` (and, to choose or learn, ``choose`` / ``_learn``). ``weigh`` and
    ``learn`` see only micro-batches in which at least one source answered.
    """

    name: ClassVar[str]
    asks_sources: ClassVar[bool] = True  # False: the run needs no source at all
    learns: ClassVar[bool] = False  # True: it reads selector.* and fusion.sharpen_temperature

    def __init__(self, config: Config, num_sources: int, **_):
        self.config = config
        self.num_sources = num_sources

    def choose(self, batch: dict, available: Tensor, step: int) -> Tensor:
        return available.expand(batch["input_ids"].shape[0], -1).clone()

    def weigh(self, batch: dict, answers: Sequence[SparseSoftLabels], ran: Tensor) -> Tensor:
        if not bool(ran.any()):
            return torch.zeros(ran.shape)
        return self._weigh(batch, answers, ran)

    def learn(self, batch: dict, answers: Sequence[SparseSoftLabels], ran: Tensor) -> None:
        if bool(ran.any()):
            self._learn(batch, answers, ran)

    def _weigh(self, batch: dict, answers: Sequence[SparseSoftLabels], ran: Tensor) -> Tensor:
        # FuseLLM's baselines weigh by per-token CE; rows a source did not answer get no weight from it.
        nll_per_token = _scores(answers, "nll_per_token").nan_to_num(nan=UNANSWERED_NLL)
        return chosen_weights(baseline_weights(self.name, nll_per_token, ran.any(0)), ran)

    def _learn(self, batch: dict, answers: Sequence[SparseSoftLabels], ran: Tensor) -> None:
        """The baselines are fixed rules."""

    def stats(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""

    def save(self, path: Path, source_names: list[str]) -> None:
        """Nothing to keep beside the model."""


class NoFusion(FusionPolicy):
    """``none``: plain continued LM training; no source is ever asked."""

    name = "none"
    asks_sources = False

    def choose(self, batch: dict, available: Tensor, step: int) -> Tensor:
        return torch.zeros(batch["input_ids"].shape[0], available.shape[0], dtype=torch.bool)


class AllUniform(FusionPolicy):
    name = "all_uniform"


class MinCE(FusionPolicy):
    name = "min_ce"


class AvgCE(FusionPolicy):
    name = "avg_ce"


class GatePolicy(FusionPolicy):
    """A policy with a selection network (replicated on every trainer rank) and its own optimizer.

    Args:
        config: the run config (``selector.*``, ``fusion.sharpen_temperature``).
        num_sources: S.
        vocab_size: rows of the selector's hashed embedding table (the target vocabulary).
        device: where the selector runs.
        seed: seed of this rank's exploration draws.
        average_gradients: averages the selector's gradients over the trainer ranks in place.
        sum_over_ranks: a tensor summed over the trainer ranks (returned; ``selector.objective: linucb``
            sums its statistics with it).
        families: each source's tokenizer family (``tokenizer_families``); needed with
            ``selector.distinct_tokenizers``, unread without it.
    """

    features: ClassVar[str]
    learns = True

    def __init__(self, config: Config, num_sources: int, *, vocab_size: int, device: torch.device, seed: int,
                 average_gradients: Callable[[Iterable[Tensor]], None], sum_over_ranks: Callable[[Tensor], Tensor],
                 families: Sequence[int] | None = None):
        super().__init__(config, num_sources)
        selector = config.selector
        if selector.distinct_tokenizers and (families is None or len(families) != num_sources):
            raise ValueError(f"selector.distinct_tokenizers needs the tokenizer family of each of the {num_sources} sources")
        self.families = torch.tensor(list(families)) if selector.distinct_tokenizers else None
        self.device = device
        self.selector = self._network(num_sources, vocab_size).to(device)
        # A selector fitted in closed form (linucb) has no parameters and no optimizer.
        parameters = list(self.selector.parameters())
        self.optimizer = torch.optim.AdamW(parameters, lr=selector.lr) if parameters else None
        self.generator = torch.Generator().manual_seed(seed)
        self.average_gradients = average_gradients
        self.sum_over_ranks = sum_over_ranks
        self._stats: dict[str, float] = {}

    def _network(self, num_sources: int, vocab_size: int) -> torch.nn.Module:
        selector = self.config.selector
        return SelectionNetwork(num_sources, self.features, vocab_size=vocab_size, embed_dim=selector.embedding_dim,
                                hidden_dim=selector.hidden_dim, gate_temperature=selector.gate_temperature)

    @property
    def max_sources(self) -> int:
        return self.config.selector.max_sources or self.num_sources

    @property
    def min_sources(self) -> int:
        return self.config.selector.sources_at_least(self.num_sources)

    def _gate_logits(self, batch: dict, answers: Sequence[SparseSoftLabels], ran: Tensor) -> Tensor:
        raise NotImplementedError

    def _chosen(self, gate_probs: Tensor, ran: Tensor) -> Tensor:
        """The sources among those that ran whose answers are fused."""
        return ran

    def _weigh(self, batch: dict, answers: Sequence[SparseSoftLabels], ran: Tensor) -> Tensor:
        with torch.no_grad():
            gate_probs = self._gate_logits(batch, answers, ran).softmax(-1).cpu()
        weights = chosen_weights(gate_probs, self._chosen(gate_probs, ran) & ran)
        sharpen = self.config.fusion.sharpen_temperature
        if sharpen is not None:
            weights = sharpen_weights(weights, _scores(answers, "nll_per_byte"), sharpen)
        return weights

    def _loss(self, batch: dict, answers: Sequence[SparseSoftLabels], ran: Tensor):
        """``(gate_logits, loss, stats)`` of the selector on what ran (the paper's ranking objective)."""
        selector = self.config.selector
        gate_logits = self._gate_logits(batch, answers, ran)
        loss, stats = selector_loss(gate_logits, ran.to(self.device), _scores(answers, "nll_per_byte").to(self.device),
                                    selector.beta, selector.target_temperature)
        return gate_logits, loss, stats

    def _learn(self, batch: dict, answers: Sequence[SparseSoftLabels], ran: Tensor) -> None:
        gate_logits, loss, stats = self._loss(batch, answers, ran)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Replicated on every trainer rank: averaged gradients keep the replicas identical.
        self.average_gradients(parameter.grad for parameter in self.selector.parameters() if parameter.grad is not None)
        self.optimizer.step()
        self._stats = {"select/loss": float(loss.detach()), "select/ce": float(stats.ce), "select/cv2": float(stats.cv2),
                       "select/gate_entropy": _entropy(gate_logits)}

    def stats(self) -> dict[str, float]:
        return self._stats

    def state_dict(self) -> dict:
        return {"selector": self.selector.state_dict(), "generator": self.generator.get_state(),
                **({"optimizer": self.optimizer.state_dict()} if self.optimizer is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        self.selector.load_state_dict(state["selector"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])

    def save(self, path: Path, source_names: list[str]) -> None:
        torch.save({**self.state_dict(), "sources": source_names}, path)


class Predictive(GatePolicy):
    """``predictive``: the gate reads the target ids, so it chooses before any source runs.

    With ``selector.objective: regression`` the network predicts each source's bits per byte on the
    sequence and the gate prefers the lowest (``fusion.selection``); with ``linucb`` a ridge regression
    fitted in closed form predicts them, and training chooses optimistically (``RidgeSelector``); with
    ``ranking`` it is the paper's gate. The first ``selector.exploration.measure_steps`` steps ask
    every available source.
    """

    name = "predictive"
    features = "ids"

    def _network(self, num_sources: int, vocab_size: int) -> torch.nn.Module:
        selector = self.config.selector
        if selector.objective == "linucb":
            return RidgeSelector(num_sources, vocab_size=vocab_size, embed_dim=selector.embedding_dim, ridge=selector.ridge,
                                 correlation=selector.correlation)
        return super()._network(num_sources, vocab_size)

    def _network_output(self, batch: dict, optimistic: bool = False) -> Tensor:
        """The network's output: predicted scores (regression, linucb; ``optimistic``: linucb's lower
        confidence bound) or gate logits (ranking)."""
        input_ids, attention_mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        if self.config.selector.objective == "linucb":
            predicted, width = self.selector(input_ids, attention_mask)
            return predicted - self.config.selector.optimism * width if optimistic else predicted
        return self.selector(input_ids, attention_mask)

    def _gate_of(self, output: Tensor) -> Tensor:
        """Gate logits from the network's output: predicted scores (regression, linucb) or logits (ranking)."""
        if self.config.selector.objective == "ranking":
            return output
        return -output / self.config.selector.gate_temperature

    def _gate_logits(self, batch: dict, answers: Sequence[SparseSoftLabels], ran: Tensor) -> Tensor:
        return self._gate_of(self._network_output(batch))

    def _loss(self, batch: dict, answers: Sequence[SparseSoftLabels], ran: Tensor):
        selector = self.config.selector
        if selector.objective != "regression":
            return super()._loss(batch, answers, ran)
        nll_per_byte = _scores(answers, "nll_per_byte").to(self.device)
        if not bool(self.selector.output_initialised):
            self.selector.init_output_bias(ran.to(self.device), nll_per_byte)
        predicted = self._network_output(batch)
        gate_logits = self._gate_of(predicted)
        loss, stats = selector_regression_loss(predicted, gate_logits, ran.to(self.device), nll_per_byte, selector.beta)
        return gate_logits, loss, stats

    def _learn(self, batch: dict, answers: Sequence[SparseSoftLabels], ran: Tensor) -> None:
        if self.config.selector.objective != "linucb":
            return super()._learn(batch, answers, ran)
        nll_per_byte = _scores(answers, "nll_per_byte")
        input_ids, attention_mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        with torch.no_grad():
            predicted, width = self.selector(input_ids, attention_mask)
            increments = self.selector.statistics(input_ids, attention_mask, ran, nll_per_byte)
            self.selector.add_statistics(self.sum_over_ranks(increments))
        error = torch.where(ran, predicted.cpu() - nll_per_byte.nan_to_num(), 0.0)
        self._stats = {"select/loss": float(error.square().sum() / ran.sum()),  # before this update
                       "select/width": float(width.cpu()[ran].mean()),
                       "select/gate_entropy": _entropy(self._gate_of(predicted))}

    def choose(self, batch: dict, available: Tensor, step: int) -> Tensor:
        exploration = self.config.selector.exploration
        if step < exploration.measure_steps:
            return available.expand(batch["input_ids"].shape[0], -1).clone()
        rate = exploration_rate_at(step, exploration.start, exploration.end, exploration.decay_steps, exploration.schedule)
        return self.route(batch, available, rate, optimistic=True)

    def route(self, batch: dict, available: Tensor, exploration_rate: float = 0.0, optimistic: bool = False) -> Tensor:
        """The selection rule on the gate's current probabilities (by default without exploration and
        optimism: what the trained selector would choose, e.g. on held-out text)."""
        selector = self.config.selector
        with torch.no_grad():
            gate_probs = self._gate_of(self._network_output(batch, optimistic)).softmax(-1).cpu()
        return select(gate_probs, selector.tau, self.min_sources, self.max_sources, exploration_rate, self.generator,
                      available, self.families)


class Scores(GatePolicy):
    """``scores`` (the paper's gate): every source runs; the gate over their realised scores picks
    whose answers are fused."""

    name = "scores"
    features = "scores"

    def _gate_logits(self, batch: dict, answers: Sequence[SparseSoftLabels], ran: Tensor) -> Tensor:
        nll_per_byte = _scores(answers, "nll_per_byte")
        # A source that did not answer a row gets that row's worst arrived score as its feature;
        # it gets no weight there anyway.
        worst = torch.where(ran, nll_per_byte, float("-inf")).amax(1, keepdim=True).nan_to_num(neginf=0.0)
        return self.selector(nll_per_byte=torch.where(ran, nll_per_byte, worst).to(self.device))

    def _chosen(self, gate_probs: Tensor, ran: Tensor) -> Tensor:
        selector = self.config.selector
        return select(gate_probs, selector.tau, self.min_sources, self.max_sources, 0.0, available_mask=ran.any(0),
                      families=self.families)


class ReferencePolicy(FusionPolicy):
    """Routing by the sources' known held-out quality (``fusion.ground_truth``), with uniform weights over
    the chosen sources that answered: what multi-teacher systems that route by dataset do. These policies
    read the ground truth that ``predictive`` must learn, so they are yardsticks, not methods."""

    def __init__(self, config: Config, num_sources: int, **_):
        super().__init__(config, num_sources)
        truth = read_ground_truth(config.fusion.ground_truth)
        self.bpb = [truth[source.name] for source in config.sources]  # per source: domain -> bits per byte
        self.mean_bpb = [sum(by_domain.values()) / max(len(by_domain), 1) for by_domain in self.bpb]

    def _best(self, available: Tensor, count: int, domain: str | None = None) -> list[int]:
        """The ``count`` best available sources on ``domain`` (by mean bpb where it was not measured)."""
        def key(source: int) -> float:
            return self.bpb[source].get(domain, self.mean_bpb[source]) if domain is not None else self.mean_bpb[source]
        return sorted(available.nonzero().flatten().tolist(), key=key)[:count]

    def _choose_for(self, available: Tensor, domain: str) -> list[int]:
        raise NotImplementedError

    def choose(self, batch: dict, available: Tensor, step: int) -> Tensor:
        chosen = torch.zeros(batch["input_ids"].shape[0], available.shape[0], dtype=torch.bool)
        for row, domain in enumerate(batch["domains"]):
            chosen[row, self._choose_for(available, domain)] = True
        return chosen

    def _weigh(self, batch: dict, answers: Sequence[SparseSoftLabels], ran: Tensor) -> Tensor:
        return chosen_weights(ran.float(), ran)


class DomainOracle(ReferencePolicy):
    """``domain_oracle``: each sequence goes to the source that is best on its domain."""

    name = "domain_oracle"

    def _choose_for(self, available: Tensor, domain: str) -> list[int]:
        return self._best(available, 1, domain)


class BestSingle(ReferencePolicy):
    """``best_single``: one source, the best by mean held-out bpb, for every sequence."""

    name = "best_single"

    def _choose_for(self, available: Tensor, domain: str) -> list[int]:
        return self._best(available, 1)


class StaticTopK(ReferencePolicy):
    """``static_top_k``: the ``fusion.static_k`` best sources by mean held-out bpb, for every sequence."""

    name = "static_top_k"

    def _choose_for(self, available: Tensor, domain: str) -> list[int]:
        return self._best(available, self.config.fusion.static_k)


POLICIES: dict[str, type[FusionPolicy]] = {policy.name: policy for policy in
                                           (NoFusion, AllUniform, MinCE, AvgCE, Scores, Predictive, DomainOracle,
                                            BestSingle, StaticTopK)}


def tokenizer_families(tokenizer_hashes: Sequence[str]) -> list[int]:
    """Per source, the index of the first source with the same tokenizer (``selector.distinct_tokenizers``),
    from each source's ``fusion.vocab_map.tokenizer_sha256``."""
    return [list(tokenizer_hashes).index(digest) for digest in tokenizer_hashes]


def make_policy(config: Config, num_sources: int, **gate_arguments) -> FusionPolicy:
    """The policy of ``fusion.mode`` over ``num_sources`` sources (``gate_arguments``: see ``GatePolicy``)."""
    return POLICIES[config.fusion.mode](config, num_sources, **gate_arguments)
