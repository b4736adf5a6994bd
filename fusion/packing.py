"""Packed rows: whole chunks of several documents per training row, up to ``max_length`` target tokens.

Every chunk already fits ``max_length`` tokens under the target's and every source's tokenizer
(``fusion.data.chunk_documents``). A packed row is a list of chunks whose target token counts
(``fusion.data.token_counts``: each chunk encoded alone, its own special tokens included) add up to
at most ``max_length``. The sources never read a row as one sequence: each scores every document
alone (``fusion.sources.base.place_segments``), and every document fits each of them, so a row
needs to fit only the target. Holding rows to ``max_length`` under every source's tokenizer too
would cap the target's utilisation by the least efficient tokenizer of each domain (the demo's
code-gpt2 needs 1.67 times the target's tokens on code: at most 0.6 there; see docs/DESIGN.md).

Rows hold chunks of one domain (routing and the reference policies count rows by domain). The
plan is best-fit decreasing on the target's tokens: chunks, longest first, each go into the row
with the least room left that holds it, else into a new row. It depends only on the chunks and
the target's tokenizer, so every rank and every resumed run builds the same rows.

``data.packing: false`` (the default) keeps one chunk per row, as before packing existed.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import datasets
import numpy as np

from fusion.data import token_counts

_FEATURES = datasets.Features({"texts": datasets.List(datasets.Value("string")),
                               "chunk_index": datasets.List(datasets.Value("int64")),
                               "domain": datasets.Value("string")})


def utilisation(tokens: int, slots: int) -> float:
    """Real tokens over the slots that hold them (padding included); NaN without slots."""
    return tokens / slots if slots else float("nan")


@dataclass(frozen=True)
class PackReport:
    """What packing did with a split: ``rows`` rows of ``max_length`` slots holding ``chunks`` chunks
    of ``tokens`` real target tokens; ``by_domain``: domain -> (rows, tokens)."""

    max_length: int
    chunks: int
    rows: int
    tokens: int
    by_domain: dict = field(default_factory=dict)

    @property
    def utilisation(self) -> float:
        """Real target tokens per slot of ``max_length``-token rows."""
        return utilisation(self.tokens, self.rows * self.max_length)

    def domain_utilisation(self) -> dict[str, float]:
        return {domain: utilisation(tokens, rows * self.max_length) for domain, (rows, tokens) in sorted(self.by_domain.items())}

    def __str__(self) -> str:
        domains = ", ".join(f"{domain} {value:.3f}" for domain, value in self.domain_utilisation().items())
        return (f"{self.chunks} chunks in {self.rows} rows of <= {self.max_length} tokens, utilisation "
                f"{self.utilisation:.3f} ({domains})")


def pack_chunks(chunks: datasets.Dataset, target_tokenizer, max_length: int, packing: bool) -> tuple[datasets.Dataset, PackReport]:
    """Rows of whole chunks (see the module docstring); one chunk per row when ``packing`` is false.

    Args:
        chunks: a chunked split (columns ``text``, ``domain`` and optionally ``chunk_index``, the
            chunk's row in the whole split; without it, a chunk's row in ``chunks``).
        target_tokenizer: the target's tokenizer.
        max_length: target tokens per row (``data.max_length``).
        packing: pack several chunks per row (``data.packing``).

    Returns:
        (a Dataset with columns ``texts`` (list of chunk texts), ``chunk_index`` (their rows in the
        split) and ``domain``, the ``TextBatchCollator``'s packed rows; the report). Without packing
        the rows keep the chunks' order.

    Raises:
        ValueError: a chunk is longer than ``max_length`` (chunk the split at this max_length).
    """
    texts, domains = chunks["text"], chunks["domain"]
    index = chunks["chunk_index"] if "chunk_index" in chunks.column_names else list(range(len(chunks)))
    counts = token_counts(texts, [target_tokenizer])
    too_long = np.flatnonzero(counts[:, 0] > max_length)
    if too_long.size:
        raise ValueError(f"chunk {index[too_long[0]]} has {int(counts[too_long[0], 0])} target tokens, more than "
                         f"max_length={max_length}; chunk the split with this max_length")
    if packing:
        plan = []
        for domain in sorted(set(domains)):
            members = [row for row, label in enumerate(domains) if label == domain]
            plan += [[members[i] for i in packed] for packed in best_fit_decreasing(counts[members, 0], max_length)]
    else:
        plan = [[row] for row in range(len(texts))]
    by_domain: dict[str, list[int]] = {}
    for members in plan:
        totals = by_domain.setdefault(domains[members[0]], [0, 0])
        totals[0] += 1
        totals[1] += int(counts[members, 0].sum())
    rows = datasets.Dataset.from_dict({"texts": [[texts[row] for row in members] for members in plan],
                                       "chunk_index": [[int(index[row]) for row in members] for members in plan],
                                       "domain": [domains[members[0]] for members in plan]}, features=_FEATURES)
    report = PackReport(max_length, len(texts), len(plan), int(counts[:, 0].sum()),
                        {domain: tuple(totals) for domain, totals in by_domain.items()})
    return rows, report


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of item indices whose ``lengths`` (``[n]``, each <= ``capacity``) sum to at most ``capacity``:
    items longest first (ties: lower index first), each into the bin with the least room left among
    those that hold it (ties: the older bin), else into a new bin. Each bin lists its items in the
    order they went in."""
    order = sorted(range(len(lengths)), key=lambda item: (-int(lengths[item]), item))
    bins: list[list[int]] = []
    room = np.empty(len(lengths), dtype=np.int64)  # per bin, the room left
    for item in order:
        need = int(lengths[item])
        fits = np.flatnonzero(room[:len(bins)] >= need)
        if fits.size:
            target = int(fits[np.argmin(room[fits])])
        else:
            target = len(bins)
            bins.append([])
            room[target] = capacity
        bins[target].append(item)
        room[target] -= need
    return bins
