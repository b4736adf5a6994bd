"""Brute-force reference for fusion.alignment: spell ids from their token strings, walk them along the text.

It never reads offsets: every id becomes the text it spells (from the token strings, family by
family, written independently of fusion.vocab_map), those spellings are walked along the text
character by character, and each token's first real character is recorded.
"""
from __future__ import annotations

import unicodedata

def _gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 bytes, inverted (character -> byte)."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


GPT2_BYTES = _gpt2_byte_alphabet()


def _splits_alone(char: str) -> bool:
    """BERT's pre-tokenizer makes punctuation and CJK ideographs words of their own."""
    code = ord(char)
    if code < 128 and not char.isalnum() and not char.isspace() and 33 <= code <= 126:
        return True
    if unicodedata.category(char).startswith("P"):
        return True
    return 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2FA1F or 0xF900 <= code <= 0xFAFF


_FACTS: dict[int, tuple] = {}


def facts(tokenizer):
    """(special ids, added ids, bytes the vocabulary has no byte-level token for), once per tokenizer."""
    key = id(tokenizer)
    if key not in _FACTS:
        vocab = tokenizer.get_vocab()
        missing = {byte for char, byte in GPT2_BYTES.items() if char not in vocab}
        added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
        specials = set(tokenizer.all_special_ids) | {index for index, token in added.items() if token.special}
        _FACTS[key] = (specials, set(added),
                       missing, tokenizer)  # the tokenizer is kept so that its id is not reused
    return _FACTS[key]


def reference_spell(tokenizer, family: str, token_id: int):
    """(bytes the token spells or None, is the unknown token, ends a word) from its token string."""
    specials, added, _, _ = facts(tokenizer)
    if token_id == tokenizer.unk_token_id:
        return None, True, False
    if token_id in specials:
        return None, False, False
    token = tokenizer.convert_ids_to_tokens(token_id)
    if token_id in added:
        return token.replace("▁", " ").encode() if family == "sentencepiece" else token.encode(), False, False
    if family == "byte_level":
        return bytes(GPT2_BYTES[c] for c in token), False, False
    if family == "sentencepiece":
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            return bytes([int(token[3:5], 16)]), False, False
        return token.replace("▁", " ").encode(), False, False
    if family == "wordpiece":
        if token.startswith("##"):
            return token[2:].encode(), False, False
        return (token if len(token) == 1 and _splits_alone(token) else " " + token).encode(), False, False
    assert family == "end_of_word"
    if token.endswith("</w>"):
        return token[:-4].encode(), False, True
    return token.encode(), False, False


# Unicode's White_Space property (what the tokenizers' regexes call \s; str.isspace also has \x1c-\x1f).
_WHITE_SPACE = set("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | {chr(c) for c in range(0x2000, 0x200B)}


def _units(tokenizer, family: str, text: str):
    """The text as (first character, normalised bytes, droppable, word break) units.

    Tokenizers without a normaliser see the text as it is, one character a unit. Normalising ones see
    each character through their normaliser (one unit per character, or per character and its
    combining marks when NFC composes them); whitespace stays itself (a newline is not a space), and
    characters the normaliser deletes, like whitespace, are dropped by the tokenizers that drop
    whitespace.
    """
    normalizer = tokenizer.backend_tokenizer.normalizer if family in ("wordpiece", "end_of_word") else None
    composes = family == "end_of_word"
    # A byte-level BPE without an unknown token silently drops bytes its vocabulary lacks (SmolLM2 has
    # no token for some control bytes).
    missing = facts(tokenizer)[2] if family == "byte_level" else set()
    units, k = [], 0
    while k < len(text):
        end = k + 1
        while composes and end < len(text) and unicodedata.combining(text[end]):
            end += 1
        if unicodedata.normalize("NFC", text[k:end]) == text[k:end]:
            end = k + 1  # nothing composes: each character is a unit
        piece = text[k:end]
        if normalizer is None:
            encoded = piece.encode("utf-8", "surrogatepass")
            kept = bytes(b for b in encoded if b not in missing)
            # Without its first byte the character starts no token (-1).
            units.append((k if kept[:1] == encoded[:1] else -1, kept, not kept, False))
            k = end
            continue
        normalised = normalizer.normalize_str(piece)
        if normalised and set(normalised) <= _WHITE_SPACE:  # a word break, kept as the character it is
            units.append((k, piece.encode(), True, True))
        else:
            normalised = normalised.strip(" ")  # BERT pads CJK characters with spaces
            units.append((k, normalised.encode(), not normalised, False))
        k = end
    return units


def reference_boundaries(tokenizer, family: str, dummy: str | None, ids, text: str):
    """(start character or None, virtual space) per token, from spellings only.

    ``dummy`` is the tokenizer's dummy-prefix rule: None, ``always`` (a normaliser that prepends
    "▁"), ``unless_space`` (Metaspace: prepends "▁" unless the text begins with a space).
    """
    units = _units(tokenizer, family, text)
    if dummy == "always" or (dummy == "unless_space" and not text.startswith(" ")):
        units.insert(0, (None, b" ", False, False))  # a space no character of the text gives
    drops = family in ("wordpiece", "end_of_word")
    unit, byte = 0, 0  # next unmatched byte: units[unit][1][byte]
    result = []
    word_initial = True
    for token_id in ids:
        surface, unknown, ends_word = reference_spell(tokenizer, family, int(token_id))
        if unknown:
            # WordPiece: the unknown token is a whole word (up to whitespace or punctuation); BPE: a character.
            while drops and unit < len(units) and units[unit][2]:
                unit += 1
            if family == "wordpiece" and unit < len(units) and not _splits_alone(text[units[unit][0]]):
                while unit < len(units) and not units[unit][3] and not _splits_alone(text[units[unit][0]]):
                    unit += 1
            else:
                unit += 1
            result.append((None, False))
            word_initial = False  # whether the unknown word ended is unknown: the next token begins none
            continue
        if surface is None:
            result.append((None, False))
            continue
        if family == "end_of_word" and word_initial:
            surface = b" " + surface
        word_initial = ends_word
        start, virtual = None, False
        for i, wanted in enumerate(surface):
            if byte == 0:
                run = unit
                while run < len(units) and units[run][2]:
                    run += 1
                # The one space a word spells is the U+0020 right before it, if there is one.
                if drops and i == 0 and wanted == 0x20 and run > unit and text[units[run - 1][0]] == " " \
                        and len(units[run - 1][1]) == 1:
                    unit = run - 1
                else:
                    unit = run
            matches = unit < len(units) and units[unit][1][byte:byte + 1] == bytes([wanted])
            if matches and units[unit][0] is None:  # the dummy prefix
                virtual = virtual or i == 0
                unit += 1
                continue
            if not matches:
                assert drops and i == 0 and wanted == 0x20, (text, token_id, surface, unit)
                virtual = True  # a word break the text has no U+0020 for
                continue
            if start is None and i == (1 if virtual else 0):
                start = units[unit][0] if byte == 0 and units[unit][0] >= 0 else None
            byte += 1
            if byte == len(units[unit][1]):
                unit, byte = unit + 1, 0
        if start is None:
            result.append((None, False))
        else:
            result.append((start, virtual))
    return result


def reference_alignment(source, target, text):
    """(aligned source position, space shift) per target position from two reference boundary lists."""
    predicting = {start: (k - 1, virtual) for k, (start, virtual) in enumerate(source) if start is not None and k > 0}
    out = []
    for t in range(len(target)):
        aligned, shift = -1, 0
        if t + 1 < len(target) and target[t + 1][0] in predicting:
            aligned, source_virtual = predicting[target[t + 1][0]]
            shift = int(target[t + 1][1]) - int(source_virtual)
        out.append((aligned, shift))
    return out


