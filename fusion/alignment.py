"""Linear-time alignment of target positions to source positions through shared character boundaries.

Both tokenizers see the same text, and a fast tokenizer reports for every token the character span
``(start, end)`` it came from (``offset_mapping``). Target position ``t`` predicts target token
``t + 1``, which starts at character ``c``; source position ``j`` is aligned to ``t`` when source
token ``j + 1`` also starts at ``c``. Then both distributions are over "what follows ``text[:c]``",
so the source's candidates, mapped to target token ids, are a soft label for target position ``t``.
Positions without such a shared boundary are invalid (``-1``): nothing is guessed.

Where a token "starts" is decided by ``token_starts`` from the spans alone, so that the families
agree on it:

* Zero-width spans (BOS/EOS/CLS/SEP and other special tokens, padding; byte-level BPE with
  ``trim_offsets=True`` also reports whitespace-only tokens as zero-width) start nothing. Special
  tokens present on one side only therefore shift nothing.
* A token that starts before the end of an earlier token starts inside a character: the byte-level
  pieces of one multi-byte character and SentencePiece ``<0xNN>`` byte-fallback tokens all carry
  that character's span, and SentencePiece's dummy-prefix ``▁`` at the start of the text shares the
  first character's span. Only the first of them starts the character; the rest start nothing,
  because a boundary inside a character is not a boundary of the text.
* Byte-level BPE and SentencePiece attach one leading space to the word after it (``Ġworld``,
  ``▁world`` span `` world``). WordPiece drops whitespace, and byte-level BPE with
  ``trim_offsets=True`` cuts the space off the span, so their ``world`` spans only ``world``. A
  token whose span is directly preceded by one whitespace character that no token covers therefore
  starts at that character: every family then follows the leading-space convention, which is also
  the one ``fusion.vocab_map`` uses for word-initial WordPiece tokens.
"""
from __future__ import annotations

import numpy as np

# Every code point for which str.isspace() holds lies below U+3001.
_WHITESPACE_CODEPOINTS = np.array([c for c in range(0x3001) if chr(c).isspace()], dtype=np.uint32)


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


def token_starts(offsets, text: str) -> np.ndarray:
    """Character at which each token starts a boundary of the text, or -1 where it starts none.

    Args:
        offsets: ``(L, 2)`` integer array-like of ``(start, end)`` character spans of one encoded
            sequence, special tokens and padding included (a fast tokenizer's ``offset_mapping``).
        text: the text that was tokenized.

    Returns:
        int64 ``(L,)``; the entries that are not -1 strictly increase. See the module docstring for
        the three rules (zero-width spans, tokens starting inside a character, uncovered whitespace).

    Raises:
        ValueError: offsets are not ``(L, 2)``, or a span lies outside the text or ends before it starts.
    """
    starts, ends = _checked_spans(offsets, text)
    nonempty = ends > starts
    # End of the furthest-reaching earlier non-empty token: a token starting before it starts inside
    # a character already begun.
    reach = np.maximum.accumulate(np.where(nonempty, ends, 0))
    earlier_reach = np.concatenate(([0], reach[:-1]))
    result = np.where(nonempty & (starts >= earlier_reach), starts, -1)

    # Characters covered by some non-empty span: +1 at each start, -1 at each end, running sum.
    edges = (np.bincount(starts[nonempty], minlength=len(text) + 1)
             - np.bincount(ends[nonempty], minlength=len(text) + 1))
    covered = np.cumsum(edges[:-1]) > 0
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    before = result - 1
    candidates = np.flatnonzero(before >= 0)
    absorb = candidates[
        ~covered[before[candidates]] & np.isin(codepoints[before[candidates]], _WHITESPACE_CODEPOINTS)
    ]
    result[absorb] -= 1
    return result


def align_next_token_positions(source_offsets, target_offsets, text: str) -> np.ndarray:
    """For each target position, the source position whose next-token distribution predicts the same boundary.

    Target position ``t`` predicts target token ``t + 1``, which starts at character ``c``
    (``token_starts``); the answer is the source position ``j`` such that source token ``j + 1`` starts
    at ``c`` too, or -1 when no source token starts there, when token ``t + 1`` starts no boundary
    (special token, padding, piece of a character), and at the last position. Linear in the number
    of tokens and characters.

    Args:
        source_offsets: ``(L_src, 2)`` character spans of the source encoding of ``text``.
        target_offsets: ``(L_tgt, 2)`` character spans of the target encoding of ``text``.
        text: the text both tokenizers encoded.

    Returns:
        int64 ``(L_tgt,)`` source positions in ``[0, L_src - 1)`` or -1.

    Raises:
        ValueError: offsets are not ``(L, 2)`` spans inside ``text``.
    """
    source_starts = token_starts(source_offsets, text)
    target_starts = token_starts(target_offsets, text)
    # Source position predicting the token that starts at each character (-1: none does).
    predictor_at = np.full(len(text), -1, dtype=np.int64)
    tokens = np.flatnonzero(source_starts >= 0)
    predictor_at[source_starts[tokens]] = tokens - 1

    aligned = np.full(len(target_starts), -1, dtype=np.int64)
    if len(target_starts) > 1:
        next_starts = target_starts[1:]
        has_start = next_starts >= 0
        aligned[:-1][has_start] = predictor_at[next_starts[has_start]]
    return aligned
