"""Packed rows: whole chunks of several documents per row, up to ``max_length`` under every tokenizer.

Every chunk already fits ``max_length`` tokens under the target's and every source's tokenizer
(``fusion.data.chunk_documents``); a packed row is a list of chunks whose token counts
(``fusion.data.token_counts``: each chunk encoded alone, its own special tokens included) add up to
at most ``max_length`` under each of those tokenizers, so every side that reads the row reads at
most ``max_length`` tokens, whether it takes the documents one by one or side by side.

Rows hold chunks of one domain (routing and the reference policies count rows by domain). The
plan is best-fit decreasing on the target's tokens: chunks, longest first, each go into the row
with the least target room left among those that hold it under every tokenizer, else into a new
row. It depends only on the chunks and the tokenizers, so every rank and every resumed run builds
the same rows.

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


def pack_chunks(chunks: datasets.Dataset, tokenizers: Sequence, max_length: int, packing: bool) -> tuple[datasets.Dataset, PackReport]:
    """Rows of whole chunks (see the module docstring); one chunk per row when ``packing`` is false.

    Args:
        chunks: a chunked split (columns ``text``, ``domain`` and optionally ``chunk_index``, the
            chunk's row in the whole split; without it, a chunk's row in ``chunks``).
        tokenizers: the target's first, then every source's (``fusion.splits.run_tokenizers``).
        max_length: tokens per row under each of them (``data.max_length``).
        packing: pack several chunks per row (``data.packing``).

    Returns:
        (a Dataset with columns ``texts`` (list of chunk texts), ``chunk_index`` (their rows in the
        split) and ``domain``, the ``TextBatchCollator``'s packed rows; the report). Without packing
        the rows keep the chunks' order.

    Raises:
        ValueError: a chunk is longer than ``max_length`` under some tokenizer (chunk with all of them).
    """
    texts, domains = chunks["text"], chunks["domain"]
    index = chunks["chunk_index"] if "chunk_index" in chunks.column_names else list(range(len(chunks)))
    # Without packing only the target's count is needed (for the report).
    counts = token_counts(texts, tokenizers if packing else tokenizers[:1])
    too_long = np.flatnonzero((counts > max_length).any(axis=1))
    if too_long.size:
        raise ValueError(f"chunk {index[too_long[0]]} has {counts[too_long[0]].tolist()} tokens under the tokenizers, more than "
                         f"max_length={max_length}; chunk the split with every tokenizer at this max_length")
    if packing:
        plan = []
        for domain in sorted(set(domains)):
            members = [row for row, label in enumerate(domains) if label == domain]
            plan += [[members[i] for i in packed] for packed in best_fit_decreasing(counts[members], max_length)]
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


def best_fit_decreasing(counts: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of item indices whose ``counts`` (``[n, K]``, every entry <= ``capacity``) sum to at most
    ``capacity`` in every column: items longest first by column 0 (ties: lower index first), each into
    the bin with the least room left in column 0 among those it fits in every column (ties: the older
    bin), else into a new bin. Each bin lists its items in the order they went in."""
    order = sorted(range(len(counts)), key=lambda item: (-int(counts[item, 0]), item))
    bins: list[list[int]] = []
    room = np.empty((len(counts), counts.shape[1]), dtype=np.int64)  # per bin, room left in every column
    for item in order:
        need = counts[item]
        fits = np.flatnonzero((room[:len(bins)] >= need).all(axis=1))
        if fits.size:
            target = int(fits[np.argmin(room[fits, 0])])
        else:
            target = len(bins)
            bins.append([])
            room[target] = capacity
        bins[target].append(item)
        room[target] -= need
    return bins
