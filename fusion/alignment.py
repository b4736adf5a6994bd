"""Linear-time alignment of target positions to source positions through shared character boundaries.

Both tokenizers see the same text. Target position ``t`` predicts target token ``t + 1``, which starts
at character ``c``; source position ``j`` is aligned to ``t`` when source token ``j + 1`` also starts
at ``c``. Then both distributions are over "what follows ``text[:c]``", so the source's candidates,
mapped to target token ids, are a soft label for target position ``t``. A target position without such
a shared boundary whose next token starts inside source token ``m`` is labelled from the source's
distribution at ``m - 1``, conditioned on the characters of token ``m`` the target has already seen
(``plan_labels``; the candidates are chosen in ``fusion.sources.scoring``). ``docs/ALIGNMENT.md``
states every rule and how it is tested.

Where a token starts is read from what the token *spells* (its surface, from
``fusion.vocab_map.spell_vocabulary``: the bytes it adds to the text), placed on the text by its
character span (``offset_mapping``). Spans alone lie in family-specific ways; the surface says how:

* A token that spells nothing (BOS/EOS/CLS/SEP, padding, other special tokens) starts nothing.
* A token whose surface begins with a UTF-8 continuation byte is a later piece of a multi-byte
  character (byte-level BPE pieces, SentencePiece ``<0xNN>`` byte fallback): it starts nothing,
  because a boundary inside a character is not a boundary of the text.
* A surface that begins with ``n`` spaces (``Ġworld``, ``▁world``, a word-initial WordPiece token,
  which spells `` world`` by the vocabulary map's convention, a CLIP-style word after a ``</w>``
  token) starts at the first of those spaces when the text has them there: inside its span
  (untrimmed byte-level BPE, SentencePiece), or just before it (byte-level BPE with
  ``trim_offsets=True`` cuts them off the span and shrinks a whitespace-only token to zero width at
  its end; WordPiece and CLIP drop whitespace). Only U+0020 counts: a newline, a tab, NBSP, U+3000
  or a character the normaliser deletes is not the space the token spells.
* Otherwise the spaces are *virtual*: a dummy prefix (SentencePiece at the start of a text, in
  every convention: zero-width ``▁``, a ``▁`` with a real span as Metaspace ``prepend_scheme:
  first`` gives it, or ``▁`` merged into the first word), or the word break of a WordPiece / CLIP
  word that follows a newline, punctuation or the start of the text. A token that is nothing but
  virtual spaces starts nothing; any other starts at its span's first character and is marked
  virtual: its candidates spell one space the text does not have (``Alignment.space_shift``).
* A token can only start after every earlier starting token's span: boundaries strictly increase.

What "the same continuation" means for normalising tokenizers (WordPiece uncased, CLIP's lower
case and NFC): they see ``norm(text)``, so a shared boundary ``c`` says that the text before ``c``
is the same text for both once normalised; their candidates are compared, through the vocabulary
map, in the target's normal form. A word break they see only as "some whitespace" is a space only
where the text has U+0020 right before the word (rule above); after any other whitespace the word
is virtual-spaced and its label loses the space (``space_shift``), so a newline is never read as a
space.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from fusion.vocab_map import spell_vocabulary


@dataclass(frozen=True)
class TokenSpelling:
    """Per-id facts about a tokenizer's surfaces that decide where its tokens start.

    Attributes (one entry per id):
        leading_spaces: int32, U+0020 characters the surface begins with.
        only_spaces: bool, the surface is one or more spaces and nothing else.
        mid_character: bool, the surface begins with a UTF-8 continuation byte.
        byte_token: bool, a SentencePiece ``<0xNN>`` byte-fallback token.
        no_text: bool, the token spells nothing (special tokens, ids without a token).
        ends_word: bool, a CLIP-style ``</w>`` token: the next token begins a new word.
        word_breaks: the tokenizer drops whitespace and marks words by ``</w>`` suffixes, so a token
            after an ``ends_word`` token (or first in the text) spells one leading space.
        byte_level: byte-level BPE, the one family whose offsets may be trimmed (``trim_offsets``).
        first_bytes: int16 ``(V, 2)``, the surface's first two bytes (-1 where it has fewer), or None
            for tokenizers that normalise the text (their surfaces spell the normalised text).
        surfaces: per id, the bytes it spells (``fusion.vocab_map.Vocabulary.surfaces``).
    """

    leading_spaces: np.ndarray
    only_spaces: np.ndarray
    mid_character: np.ndarray
    byte_token: np.ndarray
    no_text: np.ndarray
    ends_word: np.ndarray
    word_breaks: bool
    byte_level: bool
    first_bytes: np.ndarray | None
    surfaces: list

    @property
    def spells_raw_text(self) -> bool:
        """The surfaces are the text's own bytes (byte-level BPE, SentencePiece without a normaliser)."""
        return self.first_bytes is not None

    @classmethod
    def of(cls, tokenizer) -> "TokenSpelling":
        """The spelling of a fast tokenizer, computed once per tokenizer object.

        Raises:
            ValueError: the tokenizer's family is not recognised (see ``fusion.vocab_map``).
        """
        cached = _SPELLINGS.get(tokenizer)
        if cached is not None:
            return cached
        vocabulary = spell_vocabulary(tokenizer)
        size = len(vocabulary.surfaces)
        leading = np.zeros(size, dtype=np.int32)
        only_spaces = np.zeros(size, dtype=bool)
        mid = np.zeros(size, dtype=bool)
        no_text = np.zeros(size, dtype=bool)
        first_bytes = np.full((size, 2), -1, dtype=np.int16)
        for index, surface in enumerate(vocabulary.surfaces):
            if not surface:
                no_text[index] = True
                continue
            first_bytes[index, : min(2, len(surface))] = list(surface[:2])
            stripped = surface.lstrip(b" ")
            leading[index] = len(surface) - len(stripped)
            only_spaces[index] = not stripped
            mid[index] = 0x80 <= surface[0] < 0xC0
        spelling = cls(leading, only_spaces, mid, vocabulary.is_byte_token.copy(), no_text, vocabulary.ends_word.copy(),
                       vocabulary.family == "end_of_word", vocabulary.family == "byte_level",
                       first_bytes if vocabulary.family in ("byte_level", "sentencepiece") and vocabulary.fold is None
                       else None, vocabulary.surfaces)
        try:
            _SPELLINGS[tokenizer] = spelling
        except TypeError:  # an object without weak references: recomputed next time
            pass
        return spelling


_SPELLINGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Boundaries:
    """Where each token of one encoded sequence starts.

    Attributes:
        starts: int64 ``(L,)``, the character each token starts at, -1 where it starts none; the
            entries that are not -1 strictly increase.
        virtual: bool ``(L,)``, the token's first surface space is not in the text (module docstring).
        ends: int64 ``(L,)``, the end of each token's character span (byte-fallback runs resolved).
    """

    starts: np.ndarray
    virtual: np.ndarray
    ends: np.ndarray


@dataclass(frozen=True)
class Alignment:
    """Target positions aligned to source positions.

    Attributes:
        source: int64 ``(L_tgt,)``, the source position whose next token starts where target token
            ``t + 1`` starts, or -1.
        space_shift: int8 ``(L_tgt,)``: 0 where both next tokens spell the text alike; -1 where the
            source's next token begins with a virtual space the target's does not (its candidates
            must lose one leading space); +1 where the target's does and the source's does not (the
            candidates gain one). 0 wherever ``source`` is -1.
    """

    source: np.ndarray
    space_shift: np.ndarray


def _checked_spans(offsets, text: str) -> tuple[np.ndarray, np.ndarray]:
    spans = np.asarray(offsets, dtype=np.int64)
    if spans.size == 0:
        spans = spans.reshape(0, 2)
    if spans.ndim != 2 or spans.shape[1] != 2:
        raise ValueError(
            f"offsets must have shape (L, 2) of (start, end) character spans, got shape {spans.shape}; "
            "pass one sequence's offset_mapping, not a batch"
        )
    starts, ends = spans[:, 0], spans[:, 1]
    bad = (starts < 0) | (ends < starts) | (ends > len(text))
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(
            f"offset span {k} is ({starts[k]}, {ends[k]}), not inside the text of {len(text)} characters; "
            "the offsets must come from tokenizing exactly this text"
        )
    return starts, ends


def _spaces_at(codepoints: np.ndarray, begin: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Whether ``text[begin : begin + count]`` is ``count`` U+0020 characters, per entry."""
    ok = (begin >= 0) & (begin + count <= len(codepoints))
    if not ok.any():
        return ok
    # Prefix sums of "is a space" answer every range at once.
    space_count = np.concatenate(([0], np.cumsum(codepoints == 0x20)))
    safe_begin = np.where(ok, begin, 0)
    safe_end = np.where(ok, begin + count, 0)
    return ok & (space_count[safe_end] - space_count[safe_begin] == count)


def _first_utf8_byte(codepoints: np.ndarray) -> np.ndarray:
    """The first byte of each code point's UTF-8 encoding."""
    cp = codepoints.astype(np.int64)
    return np.select([cp < 0x80, cp < 0x800, cp < 0x10000], [cp, 0xC0 | (cp >> 6), 0xE0 | (cp >> 12)],
                     0xF0 | (cp >> 18))


def _byte_token_starts(ids: np.ndarray, span_starts: np.ndarray, span_ends: np.ndarray,
                       spelling: TokenSpelling) -> tuple[np.ndarray, np.ndarray]:
    """Span starts with byte-fallback runs resolved: the ``<0xNN>`` tokens spelling an unknown piece
    all carry the whole piece's span (Unigram gives a piece of several characters one span), so the
    k-th character of the piece starts at the k-th of them that begins a character (and ends one
    character later)."""
    byte_positions = np.flatnonzero(spelling.byte_token[ids])
    if byte_positions.size == 0:
        return span_starts, span_ends
    starts, ends = span_starts.copy(), span_ends.copy()
    characters_before = 0
    for previous, k in zip(np.concatenate(([-2], byte_positions[:-1])), byte_positions):
        same_piece = (previous == k - 1 and span_starts[previous] == span_starts[k]
                      and span_ends[previous] == span_ends[k])
        characters_before = characters_before if same_piece else 0
        if not spelling.mid_character[ids[k]]:
            starts[k] = min(span_starts[k] + characters_before, span_ends[k])
            characters_before += 1
        else:
            # A continuation byte belongs to the character begun before it.
            starts[k] = min(span_starts[k] + max(characters_before - 1, 0), span_ends[k])
        ends[k] = min(starts[k] + 1, span_ends[k])
    return starts, ends


def token_boundaries(ids, offsets, text: str, spelling: TokenSpelling) -> Boundaries:
    """Where the tokens of one encoding of ``text`` start (rules in the module docstring).

    Args:
        ids: ``(L,)`` token ids of the encoding, special tokens and padding included.
        offsets: ``(L, 2)`` integer ``(start, end)`` character spans of the same tokens.
        text: the text that was tokenized.
        spelling: ``TokenSpelling.of(tokenizer)`` of the tokenizer that encoded it.

    Raises:
        ValueError: offsets are not ``(L, 2)`` spans inside ``text``, their number differs from the
            ids', or an id lies outside the tokenizer.
    """
    span_starts, span_ends = _checked_spans(offsets, text)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) != len(span_starts):
        raise ValueError(f"got {len(ids)} token ids but {len(span_starts)} offset spans; pass one encoding's ids and offsets")
    size = len(spelling.no_text)
    if len(ids) and (ids.min() < 0 or ids.max() >= size):
        raise ValueError(f"token ids must lie in [0, {size}) (the tokenizer's ids); got {ids.min()}..{ids.max()}")
    no_text = spelling.no_text[ids]
    leading = spelling.leading_spaces[ids].astype(np.int64)
    only_spaces = spelling.only_spaces[ids].copy()
    span_starts, span_ends = _byte_token_starts(ids, span_starts, span_ends, spelling)
    if spelling.word_breaks:
        # The first text token and every token after a "</w>" token begin a word: one space before it.
        # The unknown token covers text but may or may not end a word: the token after it begins none.
        text_positions = np.flatnonzero(~no_text | (span_ends > span_starts))
        word_initial = np.zeros(len(ids), dtype=bool)
        if text_positions.size:
            previous_ends_word = np.concatenate(([True], spelling.ends_word[ids[text_positions[:-1]]]))
            word_initial[text_positions] = previous_ends_word
        leading = leading + word_initial
    codepoints = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)

    has_spaces = leading > 0
    # Trimming (byte-level, trim_offsets=True) also cuts trailing spaces, so a whitespace-only token
    # shrinks to zero width at its end, except the first token of the text, which keeps its start.
    first_and_trimmed = spelling.byte_level & (span_starts == 0) & (span_ends == 0) & only_spaces
    inside = (has_spaces & ((span_ends - span_starts >= leading) | first_and_trimmed)
              & _spaces_at(codepoints, span_starts, leading))
    before = has_spaces & ~inside & _spaces_at(codepoints, span_starts - leading, leading)
    virtual = has_spaces & ~inside & ~before
    start = np.where(before, span_starts - leading, span_starts)
    end = np.where(first_and_trimmed & inside, leading, np.maximum(span_ends, start))
    # One space is virtual: a token that spells nothing else (a lone dummy prefix) covers no text.
    covers_text = ~no_text & ~(virtual & only_spaces & (leading == 1)) & (end > start)
    candidate = covers_text & ~spelling.mid_character[ids]

    # A byte-level BPE drops bytes its vocabulary lacks (SmolLM2 has no token for some), and then
    # reports the following tokens' spans shifted back by the dropped characters. So a token starts
    # only after the spans of all earlier tokens that cover text (pieces of characters included),
    # and, where the surface spells the text as it is, only where the text has its first byte.
    earlier_reach = np.concatenate(([0], np.maximum.accumulate(np.where(covers_text, end, 0))[:-1]))
    candidate &= start >= earlier_reach
    if spelling.first_bytes is not None and len(codepoints):
        at = np.minimum(start, len(codepoints) - 1)
        first = spelling.first_bytes[ids, virtual.astype(np.int64)]
        candidate &= first == _first_utf8_byte(codepoints[at])
    result = np.where(candidate, start, -1)
    return Boundaries(starts=result, virtual=virtual & (result >= 0), ends=span_ends)


def align_boundaries(source: Boundaries, target: Boundaries, n_chars: int) -> Alignment:
    """Target positions aligned to source positions through shared boundaries (``Alignment``).

    Target position ``t`` gets the source position ``j`` whose next token starts where target token
    ``t + 1`` starts; the last target position, and those whose next token starts no boundary, get
    -1. Linear in the number of tokens and characters.
    """
    predictor_at = np.full(n_chars + 1, -1, dtype=np.int64)
    virtual_at = np.zeros(n_chars + 1, dtype=bool)
    tokens = np.flatnonzero(source.starts >= 0)
    predictor_at[source.starts[tokens]] = tokens - 1
    virtual_at[source.starts[tokens]] = source.virtual[tokens]

    length = len(target.starts)
    aligned = np.full(length, -1, dtype=np.int64)
    shift = np.zeros(length, dtype=np.int8)
    if length > 1:
        next_starts = target.starts[1:]
        has_start = next_starts >= 0
        at = next_starts[has_start]
        aligned[:-1][has_start] = predictor_at[at]
        shift[:-1][has_start] = target.virtual[1:][has_start].astype(np.int8) - virtual_at[at].astype(np.int8)
        shift[aligned < 0] = 0
    return Alignment(source=aligned, space_shift=shift)


def align_next_token_positions(source_ids, source_offsets, source_spelling: TokenSpelling,
                               target_ids, target_offsets, target_spelling: TokenSpelling, text: str) -> Alignment:
    """``align_boundaries`` of two encodings of ``text`` (ids, offsets and spelling of each side).

    Raises:
        ValueError: see ``token_boundaries``.
    """
    source = token_boundaries(source_ids, source_offsets, text, source_spelling)
    target = token_boundaries(target_ids, target_offsets, text, target_spelling)
    return align_boundaries(source, target, len(text))


# Why a target position has, or lacks, a source distribution to label it from (``LabelPlan.kind``).
PLAN_KINDS = ("aligned", "inside", "no_next_start", "next_virtual", "no_source_before", "source_virtual",
              "past_source_span", "source_misspells", "source_normalises")
(ALIGNED, INSIDE, NO_NEXT_START, NEXT_VIRTUAL, NO_SOURCE_BEFORE, SOURCE_VIRTUAL, PAST_SOURCE_SPAN,
 SOURCE_MISSPELLS, SOURCE_NORMALISES) = range(len(PLAN_KINDS))


@dataclass(frozen=True)
class LabelPlan:
    """Which source distribution labels each target position of one text (``plan_labels``).

    Attributes (one entry per target position ``t``; ``c`` is where target token ``t + 1`` starts):
        kind: uint8, index into ``PLAN_KINDS``: ``aligned`` (source token ``j + 1`` starts at ``c``),
            ``inside`` (``c`` lies inside source token ``m``), or why neither applies:
            ``no_next_start`` (the last position, or target token ``t + 1`` starts no boundary: a
            special token, a piece inside a character), ``next_virtual`` (it starts with a space the
            text lacks and no source token starts there), ``no_source_before`` (``c`` lies in the
            source's first token: no source position predicts it), ``source_virtual`` (token ``m``
            begins with a virtual space), ``past_source_span`` (``c`` lies after token ``m``'s span:
            text the source dropped), ``source_misspells`` (token ``m`` does not spell the text it
            covers), ``source_normalises`` (the source's surfaces spell normalised text, so the
            characters seen cannot be compared with them).
        source: int64, the source position whose next-token distribution labels ``t``: ``j`` when
            aligned, ``m - 1`` inside; -1 otherwise.
        space_shift: int8, ``Alignment.space_shift`` of aligned positions, 0 elsewhere.
        seen_from: int64, inside positions: where token ``m`` starts, so the target has already seen
            ``text[seen_from:c]`` of it; -1 elsewhere.
        next_start: int64, ``c``, -1 where target token ``t + 1`` starts no boundary.
    """

    kind: np.ndarray
    source: np.ndarray
    space_shift: np.ndarray
    seen_from: np.ndarray
    next_start: np.ndarray


def plan_labels(source: Boundaries, target: Boundaries, text: str, source_ids,
                source_spelling: TokenSpelling) -> LabelPlan:
    """The source distribution that labels each target position (``LabelPlan``).

    Aligned positions come from ``align_boundaries``. A position whose next token starts at ``c``
    without a shared boundary is *inside* source token ``m``, the last source token starting before
    ``c``, when ``m`` has a predecessor (``m >= 1``), starts with no virtual space, spans ``c`` and
    spells the text ``text[start_m:c]`` the target has seen of it; only for sources whose surfaces
    spell the raw text.

    Args:
        source, target: ``token_boundaries`` of the source's and the target's encoding of ``text``.
        text: the text both encoded.
        source_ids: ``(L_src,)`` the source's token ids.
        source_spelling: ``TokenSpelling.of(source_tokenizer)``.
    """
    alignment = align_boundaries(source, target, len(text))
    length = len(target.starts)
    kind = np.full(length, NO_NEXT_START, dtype=np.uint8)
    plan_source = alignment.source.copy()
    seen_from = np.full(length, -1, dtype=np.int64)
    next_start = np.full(length, -1, dtype=np.int64)
    if length > 1:
        next_start[:-1] = target.starts[1:]
    kind[plan_source >= 0] = ALIGNED
    starting = np.flatnonzero(source.starts >= 0)
    for t in np.flatnonzero((plan_source < 0) & (next_start >= 0)).tolist():
        c = int(next_start[t])
        if target.virtual[t + 1]:
            kind[t] = NEXT_VIRTUAL
            continue
        before = int(np.searchsorted(source.starts[starting], c, side="left")) - 1
        m = int(starting[before]) if before >= 0 else -1
        if m < 1:
            kind[t] = NO_SOURCE_BEFORE
        elif source.virtual[m]:
            kind[t] = SOURCE_VIRTUAL
        elif c >= source.ends[m]:
            kind[t] = PAST_SOURCE_SPAN
        elif not source_spelling.spells_raw_text:
            kind[t] = SOURCE_NORMALISES
        elif not (source_spelling.surfaces[int(source_ids[m])] or b"").startswith(
                text[source.starts[m]:c].encode("utf-8", "surrogatepass")):
            kind[t] = SOURCE_MISSPELLS  # dropped bytes: the token does not spell the text here
        else:
            kind[t], plan_source[t], seen_from[t] = INSIDE, m - 1, source.starts[m]
    return LabelPlan(kind=kind, source=plan_source, space_shift=alignment.space_shift, seen_from=seen_from,
                     next_start=next_start)
