"""Map a source model's token ids to a target tokenizer's ids by what the tokens spell.

Every token is first decoded to its *surface*: the bytes it contributes to the text.

* Byte-level BPE (GPT-2, SmolLM2): each character of the token stands for one byte through GPT-2's
  byte alphabet (``Ġ`` is a space, ``Ċ`` a newline); a token may be part of a multi-byte character.
* SentencePiece (Llama/Mistral, Gemma): ``▁`` is a space and ``<0xNN>`` byte-fallback tokens are
  the byte ``NN``.
* WordPiece: a ``##`` continuation spells its text; a word-initial token starts a new word, i.e.
  it is the text after a word break, so it spells a leading space plus its text, like ``Ġword`` /
  ``▁word`` in BPE vocabularies (at the very start of a text there is no space; this convention
  accepts that one-position error). Punctuation and CJK characters are exceptions: BERT's
  pre-tokenizer splits them off whether or not a space precedes them, and they are far more often
  attached (``word,``), so they spell themselves.
* Added tokens that are not special spell their content (Gemma's ``\n\n``, ``▁▁``); special tokens
  spell nothing.

* End-of-word-suffix BPE (CLIP): ``photo</w>`` spells ``photo`` and ends a word (``ends_word``).

Each source id is then mapped, in this order of preference, to one target id per *space shift*
(``fusion.alignment.Alignment.space_shift``: 0, or one leading space less (-1) or more (+1), where
one side's next token spells a space the text does not have, e.g. a SentencePiece dummy prefix):

1. *exact*: a target token with the same surface, trying the surface as is and then folded by the
   target's own case/accent/Unicode normaliser (an uncased WordPiece target sees `` The`` as
   `` the``). Special tokens map to the target special token with the same content, else
   EOS to EOS and BOS to BOS.
2. *projected*: the first token of the target's own tokenization of the surface, as text in the
   middle of a document (no BOS, no dummy prefix): the token the target would emit first for that
   continuation. This is the projection X-Token (2026) uses; a source token may map to a target
   token that spells less (``" turnkey"`` -> ``" turn"``), never to one chosen by spelling
   similarity. A source token that spells *less* than the target's (SmolLM2's single digits, ``"2"``
   where the target has ``"201"``) projects onto the target's short token; at a real position the
   scorer replaces it by the target's next token when that one spells the candidate and more of
   the text (``fusion.sources.scoring``).
3. *byte_fallback*: a surface that is not valid UTF-8 (a piece of a multi-byte character) maps to
   the target token spelling its longest proper prefix, typically the target's single-byte token
   (``<0xNN>`` or a byte-alphabet token): what a target that spells the character in bytes emits
   first. Without such a prefix (WordPiece has no byte tokens) it is dropped.
4. *dropped*: -1, when the target cannot spell the surface at all (its unknown token, or nothing),
   and for ids of a padded vocabulary beyond the tokenizer.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, normalizers

# Bump whenever a change alters any mapping, so that cached maps are rebuilt (2: projection, space shifts).
ALGORITHM_VERSION = 2

DROPPED, EXACT, BYTE_FALLBACK, PROJECTED = 0, 1, 2, 3
_KIND_NAMES = {EXACT: "exact", PROJECTED: "projected", BYTE_FALLBACK: "byte_fallback", DROPPED: "dropped"}
SPACE_SHIFTS = (0, -1, 1)

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte alphabet, inverted: printable stand-in character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL = _byte_level_decoder()


def _components(spec: dict) -> list[dict]:
    """Flatten a tokenizer.json component (normalizer, pre-tokenizer, decoder) and its Sequences."""
    for key in ("normalizers", "pretokenizers", "decoders"):
        if spec.get("type") == "Sequence" and key in spec:
            return [part for child in spec[key] for part in _components(child)]
    return [spec]


def _bert_splits_alone(char: str) -> bool:
    """Whether BERT's pre-tokenizer makes ``char`` a word of its own (punctuation, CJK ideographs)."""
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    if unicodedata.category(char).startswith("P"):
        return True
    cjk = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
           (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
    return any(lo <= code <= hi for lo, hi in cjk)


@dataclass
class Vocabulary:
    """What every id of one tokenizer spells. Arrays have one entry per id below ``size``.

    Attributes:
        family: ``byte_level``, ``sentencepiece`` (BPE or Unigram with ``▁``), ``wordpiece`` or
            ``end_of_word`` (BPE with a ``</w>``-style suffix, CLIP).
        surfaces: the bytes each id adds to the text; None for special tokens and ids without a token.
        is_byte_token: SentencePiece ``<0xNN>``.
        is_continuation: WordPiece ``##``.
        ends_word: ``end_of_word`` tokens carrying the suffix (the suffix is not in the surface).
        specials: special token content -> id.
        eos_id, bos_id: the tokenizer's EOS/BOS ids when it has them.
        fold: the tokenizer's case/accent/Unicode normalisation, None when it has none.
    """

    family: str
    surfaces: list[bytes | None]
    is_byte_token: np.ndarray
    is_continuation: np.ndarray
    ends_word: np.ndarray
    specials: dict[str, int]
    eos_id: int | None
    bos_id: int | None
    fold: normalizers.Normalizer | None


def _family(backend, pre_and_decoder: list[dict], normalizer_parts: list[dict], tokenizer) -> str:
    model = type(backend.model).__name__
    types = {part["type"] for part in pre_and_decoder}
    if model == "WordPiece":
        return "wordpiece"
    if "ByteLevel" in types:
        return "byte_level"
    if model == "BPE" and getattr(backend.model, "end_of_word_suffix", None):
        return "end_of_word"
    if "Metaspace" in types or any(
        part["type"] in ("Replace", "Prepend")
        and "▁" in (part.get("pattern", {}).get("String", ""), part.get("content", ""), part.get("prepend", ""))
        for part in pre_and_decoder + normalizer_parts
    ):
        return "sentencepiece"
    raise ValueError(
        f"cannot tell how the tokens of {type(tokenizer).__name__} {tokenizer.name_or_path!r} spell text: "
        f"model {model}, pre-tokenizer/decoder parts {sorted(types)}; supported families are "
        "byte-level BPE (ByteLevel), SentencePiece BPE/Unigram (Metaspace or a '▁' Replace/Prepend), "
        "WordPiece and end-of-word-suffix BPE (CLIP's '</w>')"
    )


def spell_vocabulary(tokenizer, size: int | None = None) -> Vocabulary:
    """What each id of a fast tokenizer spells (module docstring), for ids below ``size``.

    Args:
        tokenizer: a fast (``tokenizers``-backed) Hugging Face tokenizer.
        size: ids to describe; default ``len(tokenizer)``. Ids beyond the tokenizer spell nothing.

    Raises:
        ValueError: the tokenizer's family is not one of the four recognised.
    """
    size = len(tokenizer) if size is None else size
    backend = tokenizer.backend_tokenizer

    def spec(component) -> list[dict]:
        return _components(json.loads(component.__getstate__())) if component is not None else []

    pre_and_decoder = spec(backend.pre_tokenizer) + spec(backend.decoder)
    normalizer_parts = spec(backend.normalizer)
    family = _family(backend, pre_and_decoder, normalizer_parts, tokenizer)
    types = {part["type"] for part in pre_and_decoder}
    byte_fallback = bool(getattr(backend.model, "byte_fallback", False)) or "ByteFallback" in types
    prefix = getattr(backend.model, "continuing_subword_prefix", None) or "##"
    suffix = getattr(backend.model, "end_of_word_suffix", None) or ""

    added = backend.get_added_tokens_decoder()
    surfaces: list[bytes | None] = [None] * size
    is_byte_token = np.zeros(size, dtype=bool)
    is_continuation = np.zeros(size, dtype=bool)
    ends_word = np.zeros(size, dtype=bool)
    specials = {}
    for token, index in backend.get_vocab(with_added_tokens=True).items():
        if index >= size:
            continue
        if index in added:
            if added[index].special:
                specials[token] = index
            else:
                # Added tokens hold text as it appears (after normalisation where it applies, which
                # for SentencePiece turned spaces into "▁"), not in the byte alphabet.
                surfaces[index] = (token.replace("▁", " ") if family == "sentencepiece" else token).encode()
            continue
        if family == "byte_level":
            surfaces[index] = bytes(_BYTE_LEVEL[c] for c in token) if all(c in _BYTE_LEVEL for c in token) else token.encode()
        elif family == "sentencepiece":
            byte = _BYTE_TOKEN.match(token) if byte_fallback else None
            is_byte_token[index] = byte is not None
            surfaces[index] = bytes([int(byte.group(1), 16)]) if byte else token.replace("▁", " ").encode()
        elif family == "end_of_word":
            ends_word[index] = token.endswith(suffix)
            surfaces[index] = (token[: -len(suffix)] if ends_word[index] else token).encode()
        elif token.startswith(prefix):
            is_continuation[index] = True
            surfaces[index] = token[len(prefix):].encode()
        elif len(token) == 1 and _bert_splits_alone(token):
            surfaces[index] = token.encode()
        else:
            surfaces[index] = (" " + token).encode()

    folds = []
    for part in normalizer_parts:
        if part["type"] == "BertNormalizer":
            # Only its case and accent handling: cleaning and CJK spacing change the token boundaries.
            folds.append(normalizers.BertNormalizer(
                clean_text=False, handle_chinese_chars=False,
                strip_accents=part.get("strip_accents"), lowercase=part.get("lowercase", True),
            ))
        elif part["type"] in ("Lowercase", "StripAccents", "NFC", "NFD", "NFKC", "NFKD"):
            folds.append(getattr(normalizers, part["type"])())

    def special_id(attribute: str) -> int | None:
        index = getattr(tokenizer, attribute, None)
        return index if index is not None and index < size else None

    return Vocabulary(
        family=family,
        surfaces=surfaces,
        is_byte_token=is_byte_token,
        is_continuation=is_continuation,
        ends_word=ends_word,
        specials=specials,
        eos_id=special_id("eos_token_id"),
        bos_id=special_id("bos_token_id"),
        fold=normalizers.Sequence(folds) if folds else None,
    )


class SurfaceIndex:
    """The ids of a vocabulary sorted by surface, so that the ids whose surface extends a byte string
    are one contiguous run of ``order``, found by bisection (``extending``).

    Args:
        surfaces: per id, the bytes it spells or None (``Vocabulary.surfaces``); ids spelling nothing
            are left out.

    Attributes:
        order: int64 ``(N,)``, the ids with a surface, sorted by surface (ties by id).
    """

    def __init__(self, surfaces: list[bytes | None]):
        spelled = sorted((surface, index) for index, surface in enumerate(surfaces) if surface)
        self.order = np.fromiter((index for _, index in spelled), dtype=np.int64, count=len(spelled))
        self._sorted = [surface for surface, _ in spelled]
        self._device_orders: dict = {}

    def device_order(self, device) -> torch.Tensor:
        """``order`` as an int64 tensor on ``device`` (copied once per device)."""
        device = torch.device(device)
        if device not in self._device_orders:
            self._device_orders[device] = torch.from_numpy(self.order).to(device)
        return self._device_orders[device]

    def extending(self, prefix: bytes) -> tuple[int, int]:
        """``(lo, hi)``: ``order[lo:hi]`` are the ids whose surface starts with ``prefix`` and is longer."""
        lo = bisect.bisect_right(self._sorted, prefix)
        # Every longer surface starting with prefix sorts after prefix and before its successor (prefix
        # with its last byte below 0xFF raised by one).
        stem = prefix.rstrip(b"\xff")
        if not stem:
            return lo, len(self._sorted)
        return lo, bisect.bisect_left(self._sorted, stem[:-1] + bytes([stem[-1] + 1]), lo)


def _by_surface(vocabulary: Vocabulary) -> dict[bytes, list[int]]:
    index_of: dict[bytes, list[int]] = {}
    for index, surface in enumerate(vocabulary.surfaces):
        if surface is not None:
            index_of.setdefault(surface, []).append(index)
    return index_of


def _pick(candidates: list[int], source: Vocabulary, index: int, target: Vocabulary) -> int:
    """Choose among target tokens that spell the same bytes (SentencePiece "▁" and "<0x20>",
    WordPiece "," and "##,"): the first of the same sort as the source token, so that identical
    tokenizers map to the identity, else the lowest id."""
    for candidate in candidates:
        if (target.is_byte_token[candidate] == source.is_byte_token[index]
                and target.is_continuation[candidate] == source.is_continuation[index]):
            return candidate
    return candidates[0]


def shifted_surface(surface: bytes | None, shift: int) -> bytes | None:
    """The surface with one leading space less (-1) or more (+1); a surface without one loses none."""
    if surface is None or shift == 0:
        return surface
    if shift < 0:
        return surface[1:] if surface.startswith(b" ") and len(surface) > 1 else surface
    return b" " + surface


def _map_exact(surfaces: list[bytes | None], source: Vocabulary, target: Vocabulary,
               by_surface: dict[bytes, list[int]], table: np.ndarray, kind: np.ndarray) -> None:
    for index, surface in enumerate(surfaces):
        if surface is None:
            continue
        candidates = by_surface.get(surface)
        if candidates is None and target.fold is not None:
            try:
                candidates = by_surface.get(target.fold.normalize_str(surface.decode()).encode())
            except UnicodeDecodeError:
                pass
        if candidates is not None:
            table[index], kind[index] = _pick(candidates, source, index, target), EXACT

    for content, index in source.specials.items():
        mapped = target.specials.get(content)
        if mapped is None and index == source.eos_id:
            mapped = target.eos_id
        if mapped is None and index == source.bos_id:
            mapped = target.bos_id
        if mapped is not None:
            table[index], kind[index] = mapped, EXACT


def _without_dummy_prefix(component: dict | None) -> dict | None:
    """A normaliser or pre-tokenizer spec that adds no dummy-prefix space at the start of a text."""
    if component is None:
        return None
    kind = component.get("type")
    for key in ("normalizers", "pretokenizers"):
        if kind == "Sequence" and key in component:
            parts = [_without_dummy_prefix(part) for part in component[key]]
            return {**component, key: [part for part in parts if part is not None]}
    if kind == "Prepend" or (kind == "Replace" and component.get("pattern", {}).get("Regex") in ("\\A", "^")):
        return None
    if kind == "Metaspace":
        return {**component, "prepend_scheme": "never", "add_prefix_space": False}
    if kind == "ByteLevel":
        return {**component, "add_prefix_space": False}
    return component


class MidTextTokenizer:
    """A target tokenizer that encodes a string as if it stood in the middle of a document: no special
    tokens, no dummy prefix. ``first_tokens`` gives the token each string's tokenization starts with.
    """

    def __init__(self, tokenizer, vocabulary: Vocabulary):
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        spec["post_processor"] = None
        spec["truncation"] = None
        spec["padding"] = None
        spec["normalizer"] = _without_dummy_prefix(spec.get("normalizer"))
        spec["pre_tokenizer"] = _without_dummy_prefix(spec.get("pre_tokenizer"))
        self.backend = Tokenizer.from_str(json.dumps(spec))
        self.unknown = getattr(tokenizer, "unk_token_id", None)
        # WordPiece cannot begin a text inside a word: a continuation is encoded after an anchor word.
        self.anchor = "a" if vocabulary.family == "wordpiece" else ""
        # WordPiece and CLIP drop whitespace: their first token starts after it.
        self.drops_whitespace = vocabulary.family in ("wordpiece", "end_of_word")

    def first_tokens(self, texts: list[str]) -> np.ndarray:
        """int64 ``(len(texts),)``: the first token of each text's tokenization that starts at its first
        character, -1 where none does (the target merges it with what precedes, or spells it unknown)."""
        result = np.full(len(texts), -1, dtype=np.int64)
        needs_anchor = [bool(self.anchor) and not text.startswith(" ") for text in texts]
        encodings = self.backend.encode_batch(
            [self.anchor + text if anchor else text for text, anchor in zip(texts, needs_anchor)],
            add_special_tokens=False)
        for row, (encoding, anchor) in enumerate(zip(encodings, needs_anchor)):
            begin = len(self.anchor) if anchor else 0
            if self.drops_whitespace and not anchor:
                begin = len(texts[row]) - len(texts[row].lstrip())
            for token, (start, end) in zip(encoding.ids, encoding.offsets):
                if end <= begin and not (start == end == begin):
                    continue
                if start == begin and end > start and token != self.unknown:
                    result[row] = token
                break
        return result


def _map_projected(surfaces: list[bytes | None], projector: MidTextTokenizer,
                   table: np.ndarray, kind: np.ndarray) -> None:
    """Ids still unmapped whose surface is text map to the first token of the target's tokenization."""
    texts, indices = [], []
    for index, surface in enumerate(surfaces):
        if surface is None or kind[index] != DROPPED:
            continue
        try:
            texts.append(surface.decode())
        except UnicodeDecodeError:
            continue
        indices.append(index)
    if not texts:
        return
    first = projector.first_tokens(texts)
    found = first >= 0
    rows = np.asarray(indices)[found]
    table[rows], kind[rows] = first[found], PROJECTED


def _map_partial_characters(surfaces: list[bytes | None], source: Vocabulary, target: Vocabulary,
                            by_surface: dict[bytes, list[int]], table: np.ndarray, kind: np.ndarray) -> None:
    """Pieces of a multi-byte character map to the target token spelling their longest prefix: for a
    target that spells the character in bytes, the token it emits first (often ``<0xNN>``)."""
    for index, surface in enumerate(surfaces):
        if surface is None or kind[index] != DROPPED:
            continue
        try:
            surface.decode()
            continue
        except UnicodeDecodeError:
            pass
        for end in range(len(surface) - 1, 0, -1):
            candidates = by_surface.get(surface[:end])
            if candidates is not None:
                table[index], kind[index] = _pick(candidates, source, index, target), BYTE_FALLBACK
                break


def tokenizer_sha256(tokenizer) -> str:
    """Hash of a fast tokenizer's definition (vocabulary, merges, normaliser, special tokens).

    Truncation and padding settings are left out: transformers changes them on the backend
    tokenizer as a side effect of encoding calls, and they do not change the tokens.
    """
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    definition.pop("truncation", None)
    definition.pop("padding", None)
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode("utf-8")).hexdigest()


def _fingerprint(source_tok, target_tok, *settings) -> str:
    digest = hashlib.sha256()
    digest.update(f"{ALGORITHM_VERSION}|{settings!r}".encode())
    for tokenizer in (source_tok, target_tok):
        digest.update(tokenizer_sha256(tokenizer).encode())
        digest.update(f"|{tokenizer.eos_token_id}|{tokenizer.bos_token_id}|".encode())
    return digest.hexdigest()


@dataclass
class VocabMap:
    """Source token id -> target token id, for each space shift.

    Attributes:
        tables: int32 ``(3, V_src)``, target id or -1 (dropped), one row per entry of
            ``SPACE_SHIFTS`` (0, -1, +1). ``V_src`` is the source model's logits size, which may exceed
            its tokenizer's length (padded vocabularies).
        kinds: uint8 ``(3, V_src)``: how each id was mapped (``EXACT``, ``PROJECTED``,
            ``BYTE_FALLBACK``, ``DROPPED``).
    """

    tables: np.ndarray
    kinds: np.ndarray
    # The tables on each torch device map_topk has seen.
    _device_tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def source_to_target(self) -> np.ndarray:
        """int32 ``(V_src,)``: the map where both sides spell the text alike (space shift 0)."""
        return self.tables[0]

    @property
    def kind(self) -> np.ndarray:
        """uint8 ``(V_src,)``: how each id was mapped at space shift 0."""
        return self.kinds[0]

    @classmethod
    def build(cls, source_tok, target_tok, source_vocab_size: int,
              cache_dir: str | os.PathLike | None = None) -> "VocabMap":
        """Map every id of a source model with ``source_vocab_size`` logits onto ``target_tok``.

        Args:
            source_tok, target_tok: fast (``tokenizers``-backed) Hugging Face tokenizers.
            source_vocab_size: the source model's logits size (not ``len(source_tok)``).
            cache_dir: where to keep the map (``vocab_map-<hash>.npz``; the hash covers both
                tokenizers, the size and ``ALGORITHM_VERSION``); None: no caching.

        Raises:
            ValueError: ``source_vocab_size`` is smaller than the source tokenizer, or a tokenizer's
                family is not recognised.
        """
        if source_vocab_size < len(source_tok):
            raise ValueError(
                f"source_vocab_size={source_vocab_size} is smaller than the source tokenizer ({len(source_tok)} "
                "tokens); pass the source model's logits size (config.vocab_size / lm_head rows)"
            )
        path = None
        if cache_dir is not None:
            key = _fingerprint(source_tok, target_tok, source_vocab_size)
            path = Path(cache_dir) / f"vocab_map-{key[:24]}.npz"
            if path.exists():
                with np.load(path) as cached:
                    return cls(tables=cached["tables"], kinds=cached["kinds"])

        source = spell_vocabulary(source_tok, source_vocab_size)
        target = spell_vocabulary(target_tok, len(target_tok))
        by_surface = _by_surface(target)
        projector = MidTextTokenizer(target_tok, target)
        tables = np.full((len(SPACE_SHIFTS), source_vocab_size), -1, dtype=np.int32)
        kinds = np.full((len(SPACE_SHIFTS), source_vocab_size), DROPPED, dtype=np.uint8)
        for row, shift in enumerate(SPACE_SHIFTS):
            surfaces = [shifted_surface(surface, shift) for surface in source.surfaces]
            _map_exact(surfaces, source, target, by_surface, tables[row], kinds[row])
            _map_projected(surfaces, projector, tables[row], kinds[row])
            _map_partial_characters(surfaces, source, target, by_surface, tables[row], kinds[row])
        result = cls(tables=tables, kinds=kinds)

        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write-then-rename so that ranks building the same map at once never read half a file.
            # mkstemp, not the pid: ranks may also be threads of one process.
            handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".partial.npz")
            with os.fdopen(handle, "wb") as stream:
                np.savez(stream, tables=tables, kinds=kinds)
            os.replace(partial, path)
        return result

    def coverage(self) -> dict[str, int]:
        """Number of source ids per mapping kind at space shift 0: ``exact``, ``projected``,
        ``byte_fallback``, ``dropped``."""
        counts = np.bincount(self.kind, minlength=len(_KIND_NAMES))
        return {name: int(counts[code]) for code, name in _KIND_NAMES.items()}

    def map_topk(self, indices_src, space_shift=0):
        """Map source candidate ids to target ids.

        Args:
            indices_src: integer ``np.ndarray`` or ``torch.Tensor`` of any shape (e.g. ``[L, k]``)
                holding source ids in ``[0, V_src)``.
            space_shift: 0, -1 or +1 for all ids, or an integer array of the shape of
                ``indices_src`` without its last dimension (one shift per row of candidates).

        Returns:
            ``(indices_tgt, dropped)`` of the same kind, device and shape: int32 target ids (0 where
            dropped) and a bool mask of the dropped candidates.

        Raises:
            ValueError: an id lies outside ``[0, V_src)`` or a shift is not one of ``SPACE_SHIFTS``.
        """
        size = self.tables.shape[1]
        shift = np.asarray(space_shift.cpu() if isinstance(space_shift, torch.Tensor) else space_shift)
        if not np.isin(shift, SPACE_SHIFTS).all():
            raise ValueError(f"space_shift must be one of {SPACE_SHIFTS}; got {np.unique(shift).tolist()}")
        # Row of tables for each shift: 0 -> 0, -1 -> 1, +1 -> 2.
        rows = np.where(shift == 0, 0, np.where(shift < 0, 1, 2))
        if isinstance(indices_src, torch.Tensor):
            if indices_src.numel() and (int(indices_src.min()) < 0 or int(indices_src.max()) >= size):
                raise ValueError(f"source ids must lie in [0, {size}); got {int(indices_src.min())}..{int(indices_src.max())}")
            device = indices_src.device
            if device not in self._device_tables:
                self._device_tables[device] = torch.from_numpy(self.tables).to(device)
            row_index = torch.as_tensor(rows, device=device).long()
            if row_index.dim():
                row_index = row_index[..., None]
            mapped = self._device_tables[device][row_index, indices_src.long()]
            dropped = mapped < 0
            return torch.where(dropped, torch.zeros_like(mapped), mapped), dropped
        indices = np.asarray(indices_src)
        if indices.size and (indices.min() < 0 or indices.max() >= size):
            raise ValueError(f"source ids must lie in [0, {size}); got {indices.min()}..{indices.max()}")
        mapped = self.tables[rows[..., None] if rows.ndim else rows, indices]
        dropped = mapped < 0
        return np.where(dropped, 0, mapped).astype(np.int32), dropped
