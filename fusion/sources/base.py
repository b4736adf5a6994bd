"""What the training step needs from its sources, whatever they are (one declared interface).

``Sources`` is the interface: ``request`` the chosen rows of a micro-batch now, ``collect`` the
answers later. Three kinds implement it: models in this process (``ColocatedSources``), answers
precomputed on disk (``OfflineSources``), both through ``InProcessSources``, and the source
engine groups of a disaggregated run (``EngineSources``). ``NoSources`` is the empty pool of a
run without fusion, so the step never asks whether it has sources.

Every kind returns, per source, the answer for the whole micro-batch (rows not answered stay
invalid) and an ``[B, S]`` mask of the rows that did get an answer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from fusion.sources.answer import SparseSoftLabels

ANSWER_FIELDS = ("indices", "logprobs", "valid", "nll_per_token", "nll_per_byte")


@dataclass
class SourceCounters:
    """What one source did so far for this rank.

    ``requests`` are forward passes, ``tokens`` the target tokens of the sequences sent,
    ``seconds`` the source's compute time and ``waited`` the time the trainer was blocked on it
    (the same thing in-process; less when a disaggregated source computes ahead).
    """

    requests: int = 0
    sequences: int = 0
    tokens: int = 0
    coverage: dict = field(default_factory=dict)  # the vocabulary map's, by kind of mapping
    seconds: float = 0.0
    waited: float = 0.0
    failures: int = 0


class Sources(Protocol):
    """The pool of S sources as the trainer sees it (``S = len(names)``, the source dimension)."""

    names: list[str]
    counters: list[SourceCounters]
    down_reasons: list[dict[str, str]]  # per source: replica -> why it went down
    overlaps: bool  # answers are computed elsewhere while the trainer trains (worth requesting ahead)

    @property
    def available(self) -> torch.Tensor:
        """``[S]`` bool: sources that can be asked now."""

    def ready(self) -> None:
        """Block until every source can answer (or is marked down)."""

    def request(self, batch: dict, chosen: torch.Tensor, step: int) -> object:
        """Ask source s for the rows ``chosen[:, s]`` of ``batch``; returns a ticket for ``collect``."""

    def collect(self, ticket: object) -> tuple[list[SparseSoftLabels], torch.Tensor]:
        """``(answers, arrived)``: S answers ``[B, L, k]`` and the ``[B, S]`` rows that got one."""

    def agree_on_down(self, group) -> None:
        """Make every trainer rank see a source down once one rank saw it down."""

    def close(self, collect_reports: bool = True) -> dict:
        """Release the sources; returns what remote sources report they served, by name."""


def put_rows(full: SparseSoftLabels, rows: list[int], part: SparseSoftLabels) -> None:
    """Write ``part`` (answers of ``rows``) into ``full``, the micro-batch's answer of one source."""
    index = torch.tensor(rows)
    for name in ANSWER_FIELDS:
        getattr(full, name)[index] = getattr(part, name)


class InProcessSources:
    """Sources that answer inside this process: nothing overlaps, so the work happens at ``collect``.

    Subclasses set ``names``, ``batch_sizes``, ``top_k`` and ``counters`` and implement
    ``_fetch(source, batch, rows)``, the answers of ``rows`` of ``batch`` from one source.
    """

    names: list[str]
    batch_sizes: list[int]
    top_k: int
    counters: list[SourceCounters]
    _fetch: Callable[[int, dict, list[int]], SparseSoftLabels]

    @property
    def down_reasons(self) -> list[dict[str, str]]:
        return [{} for _ in self.names]

    @property
    def available(self) -> torch.Tensor:
        """In-process sources never go down."""
        return torch.ones(len(self.names), dtype=torch.bool)

    def ready(self) -> None:
        """Loaded at construction."""

    def agree_on_down(self, group) -> None:
        """In-process sources never go down."""

    def close(self, collect_reports: bool = True) -> dict:
        return {}

    def request(self, batch: dict, chosen: torch.Tensor, step: int) -> tuple[dict, torch.Tensor]:
        return batch, chosen

    def collect(self, ticket: tuple[dict, torch.Tensor]) -> tuple[list[SparseSoftLabels], torch.Tensor]:
        """Fetch the chosen rows of each source in ``batch_size`` pieces and assemble full answers."""
        batch, chosen = ticket
        batch_size, length = batch["input_ids"].shape
        row_tokens = batch["attention_mask"].sum(1)
        answers = []
        for source, piece_size in enumerate(self.batch_sizes):
            full = SparseSoftLabels.empty(batch_size, length, self.top_k, torch.float32)
            rows = chosen[:, source].nonzero().flatten().tolist()
            for start in range(0, len(rows), piece_size):
                part_rows = rows[start:start + piece_size]
                started = time.perf_counter()
                part = self._fetch(source, batch, part_rows)
                elapsed = time.perf_counter() - started
                counters = self.counters[source]
                counters.seconds += elapsed
                counters.waited += elapsed
                counters.requests += 1
                counters.sequences += len(part_rows)
                counters.tokens += int(row_tokens[part_rows].sum())
                put_rows(full, part_rows, part)
            answers.append(full)
        return answers, chosen


class NoSources(InProcessSources):
    """The empty pool (S = 0): a run that trains the target on the LM loss alone."""

    overlaps = False

    def __init__(self):
        self.names, self.batch_sizes, self.top_k, self.counters = [], [], 0, []


def counter_scalars(sources: Sources) -> dict[str, float]:
    """This rank's per-source counters so far (TensorBoard ``source/<name>/*``)."""
    scalars = {}
    available = sources.available
    for s, (name, counters) in enumerate(zip(sources.names, sources.counters)):
        scalars[f"source/{name}/requests"] = counters.requests
        scalars[f"source/{name}/sequences"] = counters.sequences
        scalars[f"source/{name}/latency_s"] = counters.seconds / max(counters.requests, 1)
        scalars[f"source/{name}/waited_s"] = counters.waited
        scalars[f"source/{name}/failures"] = counters.failures
        scalars[f"source/{name}/down"] = float(not bool(available[s]))
    return scalars


def wait_scalars(sources: Sources, waited_before: list[float], seconds: float) -> dict[str, float]:
    """The share of the last ``seconds`` this rank spent waiting on each source, and on all of them
    (``waited_before``: each source's ``counters.waited`` when they began)."""
    shares = {name: (counters.waited - before) / seconds
              for name, counters, before in zip(sources.names, sources.counters, waited_before)}
    return {"perf/wait_share": sum(shares.values()), **{f"perf/wait_share/{name}": share for name, share in shares.items()}}


def close_and_summarise(sources: Sources, global_sum: Callable[[torch.Tensor], torch.Tensor], seconds: float,
                        ranks: int) -> dict:
    """Close ``sources`` and sum their counters over the ``ranks`` trainer ranks (``global_sum`` all-reduces).

    Per source: what was asked, how long the trainer waited and which share of the run's ``seconds``
    that was (``wait_share``, averaged over ranks); what each remote replica reports it served
    (``served``) and why a replica went down (``down_reasons``).
    """
    available = sources.available
    served = sources.close()
    summary = {}
    for index, (name, counters) in enumerate(zip(sources.names, sources.counters)):
        local = torch.tensor([counters.requests, counters.sequences, counters.tokens, counters.seconds, counters.waited,
                              counters.failures])
        requests, sequences, tokens, compute, waited, failures = global_sum(local).tolist()
        summary[name] = {"requests": int(requests), "sequences": int(sequences), "tokens": int(tokens),
                         "compute_s": round(compute, 2), "waited_s": round(waited, 2),
                         "wait_share": round(waited / max(seconds * ranks, 1e-9), 4), "failures": int(failures),
                         "down": not bool(available[index]), "vocab_coverage": counters.coverage,
                         "down_reasons": sources.down_reasons[index]}
        if name in served:
            summary[name]["served"] = served[name]
    return summary
