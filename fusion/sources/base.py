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


def place_segments(segments, pieces: list[tuple[list[int], SparseSoftLabels]], batch_size: int, length: int,
                   top_k: int) -> tuple[SparseSoftLabels, torch.Tensor]:
    """One source's answer for a micro-batch from its answers for some of the micro-batch's documents.

    The documents of a row were scored alone (a source never conditions on the document before), so
    document i's position t lands at position ``segments.starts[i] + t`` of row ``segments.rows[i]``.
    A document's last position predicts nothing inside it and stays invalid, so no soft label crosses a
    document boundary. A row's NLLs are the means of its documents', weighted by their UTF-8 bytes
    (documents whose NLL is NaN left out); a row of one document keeps its document's exactly.

    Args:
        segments: the micro-batch's ``fusion.data.Segments``.
        pieces: ``(documents, answer)`` pairs: ``answer`` ``[len(documents), L', k]`` holds the answers of
            those documents (indices into ``segments``), each at its own positions 0...
        batch_size, length: the micro-batch's ``[B, L]``; top_k: k.

    Returns:
        (the ``[B, L, k]`` answer with float32 log-probs, ``[B]`` bool: the rows all of whose documents
        were answered; the other rows stay unanswered).
    """
    full = SparseSoftLabels.empty(batch_size, length, top_k, torch.float32)
    given = {index: (part, slot) for documents, part in pieces for slot, index in enumerate(documents)}
    by_row: dict[int, list[int]] = {}
    for index, row in enumerate(segments.rows):
        by_row.setdefault(row, []).append(index)
    arrived = torch.zeros(batch_size, dtype=torch.bool)
    for row, members in by_row.items():
        if not all(index in given for index in members):
            continue
        arrived[row] = True
        weights, sums = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        for index in members:
            (part, slot), start, count = given[index], segments.starts[index], segments.lengths[index]
            full.indices[row, start:start + count] = part.indices[slot, :count]
            full.logprobs[row, start:start + count] = part.logprobs[slot, :count].float()
            full.valid[row, start:start + count] = part.valid[slot, :count]
            nll = torch.stack([part.nll_per_token[slot], part.nll_per_byte[slot]]).double()
            size = float(len(segments.texts[index].encode("utf-8")))
            weights += torch.where(nll.isnan(), 0.0, size)
            sums += torch.where(nll.isnan(), 0.0, nll * size)
        full.nll_per_token[row], full.nll_per_byte[row] = torch.where(weights > 0, sums / weights.clamp(min=1), float("nan")).float()
    return full, arrived


class InProcessSources:
    """Sources that answer inside this process: nothing overlaps, so the work happens at ``collect``.

    Subclasses set ``names``, ``batch_sizes``, ``top_k`` and ``counters`` and implement
    ``_fetch(source, segments, documents)``, one source's answers for the documents ``documents`` of a
    micro-batch's ``fusion.data.Segments``, each at its own positions (``place_segments`` places them).
    """

    names: list[str]
    batch_sizes: list[int]
    top_k: int
    counters: list[SourceCounters]
    _fetch: Callable[[int, object, list[int]], SparseSoftLabels]

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
        """Fetch the documents of each source's chosen rows in ``batch_size`` pieces and place them in full answers."""
        batch, chosen = ticket
        batch_size, length = batch["input_ids"].shape
        segments = batch["segments"]
        answers = []
        for source, piece_size in enumerate(self.batch_sizes):
            documents = segments.of_rows(chosen[:, source].nonzero().flatten().tolist())
            pieces = []
            for start in range(0, len(documents), piece_size):
                piece = documents[start:start + piece_size]
                started = time.perf_counter()
                pieces.append((piece, self._fetch(source, segments, piece)))
                elapsed = time.perf_counter() - started
                counters = self.counters[source]
                counters.seconds += elapsed
                counters.waited += elapsed
                counters.requests += 1
                counters.sequences += len(piece)
                counters.tokens += sum(segments.lengths[index] for index in piece)
            answer, _ = place_segments(segments, pieces, batch_size, length, self.top_k)
            answers.append(answer)
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
