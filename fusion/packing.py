"""Packed rows: several documents of one domain per training row, up to ``max_length`` target tokens.

Every chunk already fits ``max_length`` tokens under the target's and every source's tokenizer
(``fusion.data.chunk_documents``). A packed row is a list of documents whose target token counts
(``fusion.data.token_counts``: each document encoded alone, its own special tokens included) add
up to at most ``max_length``. The sources never read a row as one sequence: each scores every
document alone (``fusion.sources.base.place_segments``), and every document fits each of them, so a
row needs to fit only the target. Holding rows to ``max_length`` under every source's tokenizer too
would cap the target's utilisation by the least efficient tokenizer of each domain (the demo's
code-gpt2 needs 1.67 times the target's tokens on code: at most 0.6 there; see docs/DESIGN.md).

Rows hold documents of one domain (routing and the reference policies count rows by domain). The
plan (``fill_rows``) is best-fit decreasing on the target's tokens: chunks, longest first, each go
into the row with the least room left that holds it. With ``data.min_piece_tokens`` (the default)
a chunk that no row holds whole is cut in its text, at a word start, into a head that fills the
row with the most room and a tail placed the same way (``cut_at_word``), provided that row has at
least ``min_piece_tokens`` of room and both pieces keep at least that many target tokens; else it
opens a new row. Each piece is a document of its own: it is encoded alone (its own BOS), its first
token is not a target, its position ids restart, every source scores it alone, and offline
answers are stored per piece (``Packed.pieces`` is the split they are computed over). Because the
pieces are text, the target and every source read the same pieces. With ``min_piece_tokens: null``
chunks are packed whole (rows of whole chunks, offline answers per chunk).

The plan depends only on the chunks (in their order), the tokenizers, ``max_length`` and
``min_piece_tokens``, so every rank and every resumed run builds the same rows and pieces.

``data.packing: false`` (the default) keeps one chunk per row, as before packing existed.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import datasets
import numpy as np

from fusion.data import _IS_SPACE, token_counts

_FEATURES = datasets.Features({"texts": datasets.List(datasets.Value("string")),
                               "chunk_index": datasets.List(datasets.Value("int64")),
                               "domain": datasets.Value("string")})
_PIECE_FEATURES = datasets.Features({"text": datasets.Value("string"), "domain": datasets.Value("string"),
                                     "chunk_index": datasets.Value("int64"), "start": datasets.Value("int64")})
# A cut at a line start is preferred to a later one at a space when it gives up at most this share
# of the row's room (and never more than min_piece tokens): lines are the corpus's natural units.
_LINE_SLACK = 1 / 64
# Cut positions tried (latest first) before a cut is given up: the estimate from the piece's token
# offsets is off only where tokens merge differently at the cut, so the first one almost always fits.
_CUT_TRIES = 8


def utilisation(tokens: int, slots: int) -> float:
    """Real tokens over the slots that hold them (padding included); NaN without slots."""
    return tokens / slots if slots else float("nan")


@dataclass(frozen=True)
class PackReport:
    """What packing did with a split: ``rows`` rows of ``max_length`` slots holding ``chunks`` chunks,
    as ``pieces`` documents (more than ``chunks`` where chunks were cut) of ``tokens`` real target
    tokens (each document's own special tokens included); ``by_domain``: domain -> (rows, tokens)."""

    max_length: int
    chunks: int
    rows: int
    tokens: int
    by_domain: dict = field(default_factory=dict)
    pieces: int | None = None  # None: as many as chunks

    @property
    def documents(self) -> int:
        """Documents in the rows: the pieces, or the chunks when none was cut."""
        return self.chunks if self.pieces is None else self.pieces

    @property
    def utilisation(self) -> float:
        """Real target tokens per slot of ``max_length``-token rows."""
        return utilisation(self.tokens, self.rows * self.max_length)

    def domain_utilisation(self) -> dict[str, float]:
        return {domain: utilisation(tokens, rows * self.max_length) for domain, (rows, tokens) in sorted(self.by_domain.items())}

    def __str__(self) -> str:
        domains = ", ".join(f"{domain} {value:.3f}" for domain, value in self.domain_utilisation().items())
        cut = f" (cut into {self.documents} pieces)" if self.documents != self.chunks else ""
        return (f"{self.chunks} chunks{cut} in {self.rows} rows of <= {self.max_length} tokens, utilisation "
                f"{self.utilisation:.3f} ({domains})")


class Packed(NamedTuple):
    """``pack_chunks``'s result.

    Attributes:
        rows: the ``TextBatchCollator``'s rows: columns ``texts`` (the documents' texts), ``chunk_index``
            (each document's row in the split offline answers are keyed on: the chunked split, or
            ``pieces`` when chunks are cut) and ``domain``.
        pieces: with ``min_piece_tokens``, the documents the rows hold, one entry per piece, in chunk order and
            within a chunk in text order (columns ``text``, ``domain``, ``chunk_index``: the chunk's row
            in the split, ``start``: the piece's first character in the chunk); the split offline
            answers are computed over (``launch/precompute.py``). None without cutting.
        report: see ``PackReport``.
    """

    rows: datasets.Dataset
    pieces: datasets.Dataset | None
    report: PackReport


def pack_chunks(chunks: datasets.Dataset, tokenizers: Sequence, max_length: int, packing: bool,
                min_piece_tokens: int | None = None) -> Packed:
    """Rows of documents (see the module docstring); one chunk per row when ``packing`` is false.

    Args:
        chunks: a chunked split (columns ``text``, ``domain`` and optionally ``chunk_index``, the
            chunk's row in the whole split; without it, a chunk's row in ``chunks``).
        tokenizers: the target's tokenizer, then every source's (``fusion.splits.run_tokenizers``):
            rows are measured with the first, and every piece cut off a chunk fits them all.
        max_length: target tokens per row (``data.max_length``).
        packing: pack several documents per row (``data.packing``).
        min_piece_tokens: with ``packing``, cut chunks that no row holds whole into pieces of at least
            this many target tokens (``data.min_piece_tokens``); None: whole chunks only.

    Returns:
        ``Packed``. Without packing the rows keep the chunks' order.

    Raises:
        ValueError: a chunk is longer than ``max_length`` (chunk the split at this max_length), or
            ``min_piece_tokens`` is below 1.
    """
    if min_piece_tokens is not None and min_piece_tokens < 1:
        raise ValueError(f"min_piece_tokens must be >= 1 or None, got {min_piece_tokens}")
    target_tokenizer = tokenizers[0]
    texts, domains = list(chunks["text"]), list(chunks["domain"])
    index = list(chunks["chunk_index"]) if "chunk_index" in chunks.column_names else list(range(len(chunks)))
    counts = token_counts(texts, [target_tokenizer])[:, 0]
    too_long = np.flatnonzero(counts > max_length)
    if too_long.size:
        raise ValueError(f"chunk {index[too_long[0]]} has {int(counts[too_long[0]])} target tokens, more than "
                         f"max_length={max_length}; chunk the split with this max_length")
    cutting = packing and min_piece_tokens is not None
    if not packing:
        plan = [[Piece(row, 0, len(texts[row]), int(counts[row]))] for row in range(len(texts))]
    else:
        # The plan cuts checking the target alone; the pieces are then checked under every source in
        # one batched call per tokenizer. A chunk with a piece that does not fit one is packed whole in
        # a new plan (the chunk itself fits them all), until every piece fits.
        whole: set[int] = set()
        while True:
            plan = _plan(texts, domains, counts, target_tokenizer, max_length, min_piece_tokens if cutting else None, whole)
            cut_pieces = [p for row in plan for p in row if p.end - p.start < len(texts[p.item])]
            excess = token_counts([texts[p.item][p.start:p.end] for p in cut_pieces], tokenizers[1:]) > max_length
            too_long = {cut_pieces[n].item for n in np.flatnonzero(excess.any(axis=1))}
            if not too_long:
                break
            whole |= too_long
    by_domain: dict[str, list[int]] = {}
    for row in plan:
        totals = by_domain.setdefault(domains[row[0].item], [0, 0])
        totals[0] += 1
        totals[1] += sum(p.tokens for p in row)
    pieces = None
    if cutting:
        ordered = sorted({(p.item, p.start, p.end) for row in plan for p in row})
        number = {key: n for n, key in enumerate(ordered)}
        pieces = datasets.Dataset.from_dict({"text": [texts[item][start:end] for item, start, end in ordered],
                                             "domain": [domains[item] for item, _, _ in ordered],
                                             "chunk_index": [int(index[item]) for item, _, _ in ordered],
                                             "start": [start for _, start, _ in ordered]}, features=_PIECE_FEATURES)
        row_index = [[number[(p.item, p.start, p.end)] for p in row] for row in plan]
    else:
        row_index = [[int(index[p.item]) for p in row] for row in plan]
    rows = datasets.Dataset.from_dict({"texts": [[texts[p.item][p.start:p.end] for p in row] for row in plan],
                                       "chunk_index": row_index,
                                       "domain": [domains[row[0].item] for row in plan]}, features=_FEATURES)
    report = PackReport(max_length, len(texts), len(plan), sum(totals[1] for totals in by_domain.values()),
                        {domain: tuple(totals) for domain, totals in by_domain.items()},
                        None if pieces is None else len(pieces))
    return Packed(rows, pieces, report)


def _plan(texts: list[str], domains: list[str], counts: np.ndarray, target_tokenizer, max_length: int,
          min_piece: int | None, whole: set[int]) -> list[list[Piece]]:
    """Rows of pieces of each domain in turn (``fill_rows``; a piece's item is its chunk's row in ``texts``),
    cutting chunks with ``WordCutter`` when ``min_piece`` is given, except the chunks in ``whole``."""
    plan = []
    for domain in sorted(set(domains)):
        members = [row for row, label in enumerate(domains) if label == domain]
        cut = None
        if min_piece is not None:
            cut = WordCutter([texts[row] for row in members], target_tokenizer, max_length, min_piece,
                             {local for local, row in enumerate(members) if row in whole})
        rows = fill_rows(counts[members], max_length, [len(texts[row]) for row in members], min_piece, cut)
        plan += [[Piece(members[p.item], p.start, p.end, p.tokens) for p in row] for row in rows]
    return plan


class Piece(NamedTuple):
    """Characters (or, for ``fill_rows`` alone, any unit) ``[start, end)`` of item ``item``, ``tokens`` target
    tokens when encoded alone."""

    item: int
    start: int
    end: int
    tokens: int


# (piece, room) -> (head, tail) or None: see fill_rows.
Cutter = Callable[[Piece, int], "tuple[Piece, Piece] | None"]


def fill_rows(lengths: np.ndarray, capacity: int, extents: Sequence[int] | None = None, min_piece: int | None = None,
              cut: Cutter | None = None) -> list[list[Piece]]:
    """Rows of pieces of items whose tokens sum to at most ``capacity``.

    Items go longest first (ties: lower index first). A piece goes into the row with the least room
    left among those that hold it (ties: the older row). When none holds it and ``cut`` is given, the
    row with the most room (ties: the older) is filled by cutting the piece, if that room is at least
    ``min_piece``: ``cut(piece, room)`` returns a head (at most ``room`` tokens, at least ``min_piece``)
    and a tail (at least ``min_piece``) that together are the piece, or None where no such cut
    exists; the head goes into that row and the tail is placed in turn. Otherwise the piece opens a
    new row. So a row opens only when no open row holds the piece and the widest has less room than
    ``min_piece`` or gives no cut, and a piece is cut only when no row holds it whole.

    Args:
        lengths: ``[n]`` tokens of each whole item, each <= ``capacity``.
        capacity: tokens per row.
        extents: ``n`` ends of the items (a whole item is ``Piece(i, 0, extents[i], lengths[i])``);
            default ``lengths``.
        min_piece, cut: see above; without ``cut`` this is plain best-fit decreasing.

    Returns:
        Rows, each listing its pieces in the order they went in. The pieces of an item tile
        ``[0, extents[item])``.
    """
    extents = [int(length) for length in lengths] if extents is None else list(extents)
    order = sorted(range(len(lengths)), key=lambda item: (-int(lengths[item]), item))
    rows: list[list[Piece]] = []
    room = np.empty(len(lengths), dtype=np.int64)  # per row, the room left; each item opens at most one row
    for item in order:
        piece = Piece(item, 0, extents[item], int(lengths[item]))
        while True:
            open_room = room[:len(rows)]
            fits = np.flatnonzero(open_room >= piece.tokens)
            if fits.size:
                target = int(fits[np.argmin(open_room[fits])])
            else:
                widest = int(np.argmax(open_room)) if len(rows) else -1
                split = None
                if cut is not None and widest >= 0 and open_room[widest] >= min_piece:
                    split = cut(piece, int(open_room[widest]))
                if split is not None:
                    head, piece = split
                    rows[widest].append(head)
                    room[widest] -= head.tokens
                    continue
                target = len(rows)
                rows.append([])
                room[target] = capacity
            rows[target].append(piece)
            room[target] -= piece.tokens
            break
    return rows


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of item indices whose ``lengths`` (``[n]``, each <= ``capacity``) sum to at most ``capacity``:
    items longest first (ties: lower index first), each into the bin with the least room left among
    those that hold it (ties: the older bin), else into a new bin. Each bin lists its items in the
    order they went in (``fill_rows`` without cutting)."""
    return [[piece.item for piece in row] for row in fill_rows(lengths, capacity)]


class WordCutter:
    """``fill_rows``'s ``cut`` for texts: cuts a piece of ``texts[item]`` at a word start (a non-space
    character after whitespace), so the head keeps the whitespace after its last word, as chunk ends
    do (``fusion.data.chunk_documents``).

    The cut is the latest word start whose head fits the room, preferring a line start that gives up
    at most ``_LINE_SLACK`` of the room (and at most ``min_piece`` tokens); both pieces keep at least
    ``min_piece`` target tokens, each encoded alone (checked exactly; the plan estimates from the
    piece's token offsets). Items in ``whole`` are never cut. ``pack_chunks`` checks the pieces under
    the sources' tokenizers.
    """

    def __init__(self, texts: Sequence[str], target_tokenizer, max_length: int, min_piece: int, whole: set[int] = frozenset()):
        self.texts = texts
        self.tokenizer = target_tokenizer
        self.max_length = max_length
        self.min_piece = min_piece
        self.whole = whole
        self.specials = (len(target_tokenizer("a", verbose=False)["input_ids"])
                         - len(target_tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]))

    def __call__(self, piece: Piece, room: int) -> tuple[Piece, Piece] | None:
        if piece.item in self.whole:
            return None
        text = self.texts[piece.item][piece.start:piece.end]
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        space = _IS_SPACE[np.minimum(codepoints, len(_IS_SPACE) - 1)]
        positions = np.flatnonzero(space[:-1] & ~space[1:]) + 1  # word starts
        if not positions.size:
            return None
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True,
                                 verbose=False)["offset_mapping"]
        starts = np.maximum.accumulate(np.array([pair[0] for pair in offsets], dtype=np.int64)) if offsets else np.zeros(0, np.int64)
        head = self.specials + np.searchsorted(starts, positions, side="left")  # tokens starting before the cut
        tail = self.specials + len(starts) - (head - self.specials)
        usable = np.flatnonzero((head <= room) & (head >= self.min_piece) & (tail >= self.min_piece))
        if not usable.size:
            return None
        best = int(head[usable[-1]])
        slack = min(self.min_piece, int(room * _LINE_SLACK))
        # Line starts: a newline in the whitespace before the word.
        lines = [at for at in usable[::-1] if head[at] >= best - slack
                 and "\n" in text[len(text[:positions[at]].rstrip()):positions[at]]][:1]
        tries = lines + [at for at in usable[::-1][:_CUT_TRIES] if at not in lines]
        for at in tries:
            cut = int(positions[at])
            head_tokens, tail_tokens = token_counts([text[:cut], text[cut:]], [self.tokenizer])[:, 0].tolist()
            if self.min_piece <= head_tokens <= room and self.min_piece <= tail_tokens <= self.max_length:
                middle = piece.start + cut
                return (Piece(piece.item, piece.start, middle, head_tokens),
                        Piece(piece.item, middle, piece.end, tail_tokens))
        return None
