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

Each source id is then mapped, in this order of preference:

1. *exact*: a target token with the same surface, trying the surface as is and then folded by the
   target's own case/accent/Unicode normaliser (an uncased WordPiece target sees `` The`` as
   `` the``). Special tokens map to the target special token with the same content, else
   EOS to EOS and BOS to BOS.
2. *byte_fallback*: a surface that is not valid UTF-8 (a piece of a multi-byte character) maps to
   the target token spelling its longest proper prefix, typically the target's single-byte token
   (``<0xNN>`` or a byte-alphabet token): what a target that spells the character in bytes emits
   first. Without such a prefix (WordPiece has no byte tokens) it is dropped.
3. *nearest*: the target token at the smallest Levenshtein distance (FuseLLM's MinED, ties to the
   lowest id) among those at most ``max_edits`` edits and at most ``max_normalized_distance`` times
   the longer length away. The default of one edit keeps what edit distance gets right (case,
   accents, a leading space, a plural ``s``); two edits map many words to unrelated ones
   (`` Fighter`` -> `` lighter``, `` predator`` -> `` creator`` between GPT-2 and Mistral) and
   cost several times more.
4. *dropped*: -1, also for ids of a padded vocabulary beyond the tokenizer.
"""
from __future__ import annotations

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
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein
from tokenizers import normalizers

# Bump whenever a change alters any mapping, so that cached maps are rebuilt.
ALGORITHM_VERSION = 1

DROPPED, EXACT, BYTE_FALLBACK, NEAREST = 0, 1, 2, 3
_KIND_NAMES = {EXACT: "exact", BYTE_FALLBACK: "byte_fallback", NEAREST: "nearest", DROPPED: "dropped"}

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


def _map_exact(source: Vocabulary, target: Vocabulary, by_surface: dict[bytes, list[int]],
               table: np.ndarray, kind: np.ndarray) -> None:
    for index, surface in enumerate(source.surfaces):
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


def _map_partial_characters(source: Vocabulary, target: Vocabulary, by_surface: dict[bytes, list[int]],
                            table: np.ndarray, kind: np.ndarray) -> None:
    """Pieces of a multi-byte character map to the target token spelling their longest prefix: for a
    target that spells the character in bytes, the token it emits first (often ``<0xNN>``)."""
    for index, surface in enumerate(source.surfaces):
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


def _deletion_keys(text: str, depth: int) -> set[str]:
    """Every string obtained from ``text`` by deleting at most ``depth`` characters."""
    keys = {text}
    frontier = {text}
    for _ in range(depth):
        frontier = {word[:i] + word[i + 1:] for word in frontier for i in range(len(word))}
        keys |= frontier
    return keys


def _deletion_depth(length: int, cutoff: float, max_edits: int) -> int:
    """Most characters a string of ``length`` characters must lose to reach a key it shares with a
    match. For a partner of length ``m`` within ``k`` edits, the string loses its substituted and
    deleted characters, ``k - max(0, m - length)`` at most, with ``k <= cutoff * max(length, m)``;
    this is largest for partners no longer than the string: ``cutoff * length``."""
    return min(max_edits, int(cutoff * length + 1e-9))


def _key_table(texts: list[str], cutoff: float, max_edits: int) -> tuple[np.ndarray, np.ndarray]:
    """(hash of a deletion key, index of the text it came from), sorted by hash."""
    hashes, owners = [], []
    for owner, text in enumerate(texts):
        keys = _deletion_keys(text, _deletion_depth(len(text), cutoff, max_edits))
        hashes.extend(hash(key) for key in keys)
        owners.extend([owner] * len(keys))
    hashes = np.asarray(hashes, dtype=np.int64)
    owners = np.asarray(owners, dtype=np.int64)
    order = np.argsort(hashes, kind="stable")
    return hashes[order], owners[order]


def _map_nearest(source: Vocabulary, target: Vocabulary, table: np.ndarray, kind: np.ndarray,
                 cutoff: float, max_edits: int) -> None:
    """Strings within ``d`` edits of each other become equal after deleting at most ``d`` characters
    from each (the substituted and inserted ones), so joining the two sides on their deletion keys
    finds every pair within ``max_edits`` edits without comparing every pair; the candidates are
    then checked with the exact Levenshtein distance."""
    choices: dict[str, int] = {}
    for index, surface in enumerate(target.surfaces):
        if surface is None or target.is_byte_token[index]:
            continue
        try:
            choices.setdefault(surface.decode(), index)
        except UnicodeDecodeError:
            continue
    queries, query_ids = [], []
    for index, surface in enumerate(source.surfaces):
        if surface is None or kind[index] != DROPPED:
            continue
        try:
            text = surface.decode()
        except UnicodeDecodeError:
            continue
        queries.append(target.fold.normalize_str(text) if target.fold is not None else text)
        query_ids.append(index)
    if not choices or not queries or cutoff <= 0 or max_edits <= 0:
        return
    choice_text = list(choices)
    choice_ids = np.fromiter(choices.values(), dtype=np.int64, count=len(choices))

    choice_hash, choice_owner = _key_table(choice_text, cutoff, max_edits)
    query_hash, query_owner = _key_table(queries, cutoff, max_edits)
    lo = np.searchsorted(choice_hash, query_hash, side="left")
    hi = np.searchsorted(choice_hash, query_hash, side="right")
    matches = hi - lo
    pair_query = np.repeat(query_owner, matches)
    # Positions lo..hi-1 of every query key, laid end to end.
    pair_choice = choice_owner[np.repeat(lo - np.cumsum(matches) + matches, matches) + np.arange(matches.sum())]
    pairs = np.unique(pair_query * len(choice_text) + pair_choice)
    pair_query, pair_choice = pairs // len(choice_text), pairs % len(choice_text)

    query_len = np.fromiter(map(len, queries), dtype=np.int64, count=len(queries))[pair_query]
    choice_len = np.fromiter(map(len, choice_text), dtype=np.int64, count=len(choice_text))[pair_choice]
    longer = np.maximum(query_len, choice_len)
    budget = np.minimum(max_edits, np.floor(cutoff * longer + 1e-9).astype(np.int64))
    feasible = np.abs(query_len - choice_len) <= budget
    pair_query, pair_choice, budget = pair_query[feasible], pair_choice[feasible], budget[feasible]
    if len(pair_query) == 0:
        return
    distance = process.cpdist(
        [queries[i] for i in pair_query], [choice_text[i] for i in pair_choice],
        scorer=Levenshtein.distance, dtype=np.int64, workers=-1,
    )
    close = distance <= budget
    pair_query, pair_choice, distance = pair_query[close], pair_choice[close], distance[close]
    # Per query: smallest distance, then lowest target id.
    order = np.lexsort((choice_ids[pair_choice], distance, pair_query))
    first = np.unique(pair_query[order], return_index=True)[1]
    for position in order[first]:
        index = query_ids[pair_query[position]]
        table[index], kind[index] = choice_ids[pair_choice[position]], NEAREST


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
    """Source token id -> target token id.

    Attributes:
        source_to_target: int32 ``(V_src,)``, target id or -1 (dropped). ``V_src`` is the source
            model's logits size, which may exceed its tokenizer's length (padded vocabularies).
        kind: uint8 ``(V_src,)``: how each id was mapped (``EXACT``, ``BYTE_FALLBACK``, ``NEAREST``,
            ``DROPPED``).
    """

    source_to_target: np.ndarray
    kind: np.ndarray
    # The table on each torch device map_topk has seen.
    _device_tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, source_tok, target_tok, source_vocab_size: int, cache_dir: str | os.PathLike | None = None,
              max_normalized_distance: float = 1 / 3, max_edits: int = 1) -> "VocabMap":
        """Map every id of a source model with ``source_vocab_size`` logits onto ``target_tok``.

        Args:
            source_tok, target_tok: fast (``tokenizers``-backed) Hugging Face tokenizers.
            source_vocab_size: the source model's logits size (not ``len(source_tok)``).
            cache_dir: where to keep the map (``vocab_map-<hash>.npz``; the hash covers both
                tokenizers, every argument and ``ALGORITHM_VERSION``); None: no caching.
            max_normalized_distance: nearest matches are at most this share of the longer token's
                characters away, in [0, 1].
            max_edits: nearest matches are at most this many edits away; 0 disables them.

        Raises:
            ValueError: ``source_vocab_size`` is smaller than the source tokenizer, a cut-off is
                out of range, or a tokenizer's family is not recognised.
        """
        if source_vocab_size < len(source_tok):
            raise ValueError(
                f"source_vocab_size={source_vocab_size} is smaller than the source tokenizer ({len(source_tok)} "
                "tokens); pass the source model's logits size (config.vocab_size / lm_head rows)"
            )
        if not 0 <= max_normalized_distance <= 1:
            raise ValueError(f"max_normalized_distance={max_normalized_distance} must lie in [0, 1]")
        if max_edits < 0:
            raise ValueError(f"max_edits={max_edits} must be >= 0 (0 disables nearest matches)")
        path = None
        if cache_dir is not None:
            key = _fingerprint(source_tok, target_tok, source_vocab_size, max_normalized_distance, max_edits)
            path = Path(cache_dir) / f"vocab_map-{key[:24]}.npz"
            if path.exists():
                with np.load(path) as cached:
                    return cls(source_to_target=cached["source_to_target"], kind=cached["kind"])

        source = spell_vocabulary(source_tok, source_vocab_size)
        target = spell_vocabulary(target_tok, len(target_tok))
        table = np.full(source_vocab_size, -1, dtype=np.int32)
        kind = np.full(source_vocab_size, DROPPED, dtype=np.uint8)
        by_surface = _by_surface(target)
        _map_exact(source, target, by_surface, table, kind)
        _map_partial_characters(source, target, by_surface, table, kind)
        _map_nearest(source, target, table, kind, max_normalized_distance, max_edits)
        result = cls(source_to_target=table, kind=kind)

        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write-then-rename so that ranks building the same map at once never read half a file.
            # mkstemp, not the pid: ranks may also be threads of one process.
            handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".partial.npz")
            with os.fdopen(handle, "wb") as stream:
                np.savez(stream, source_to_target=table, kind=kind)
            os.replace(partial, path)
        return result

    def coverage(self) -> dict[str, int]:
        """Number of source ids per mapping kind: ``exact``, ``byte_fallback``, ``nearest``, ``dropped``."""
        counts = np.bincount(self.kind, minlength=len(_KIND_NAMES))
        return {name: int(counts[code]) for code, name in _KIND_NAMES.items()}

    def map_topk(self, indices_src):
        """Map source candidate ids to target ids.

        Args:
            indices_src: integer ``np.ndarray`` or ``torch.Tensor`` of any shape (e.g. ``[L, k]``)
                holding source ids in ``[0, V_src)``.

        Returns:
            ``(indices_tgt, dropped)`` of the same kind, device and shape: int32 target ids (0 where
            dropped) and a bool mask of the dropped candidates.

        Raises:
            ValueError: an id lies outside ``[0, V_src)``.
        """
        size = len(self.source_to_target)
        if isinstance(indices_src, torch.Tensor):
            if indices_src.numel() and (int(indices_src.min()) < 0 or int(indices_src.max()) >= size):
                raise ValueError(f"source ids must lie in [0, {size}); got {int(indices_src.min())}..{int(indices_src.max())}")
            device = indices_src.device
            if device not in self._device_tables:
                self._device_tables[device] = torch.from_numpy(self.source_to_target).to(device)
            mapped = self._device_tables[device][indices_src.long()]
            dropped = mapped < 0
            return torch.where(dropped, torch.zeros_like(mapped), mapped), dropped
        indices = np.asarray(indices_src)
        if indices.size and (indices.min() < 0 or indices.max() >= size):
            raise ValueError(f"source ids must lie in [0, {size}); got {indices.min()}..{indices.max()}")
        mapped = self.source_to_target[indices]
        dropped = mapped < 0
        return np.where(dropped, 0, mapped).astype(np.int32), dropped
