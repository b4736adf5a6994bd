"""Vocabulary mapping between tokenizer families (fusion.vocab_map).

Exact matches are checked by hand on known tokens of the five real families; nearest matches
against a brute-force search over every pair of tokens.
"""
from __future__ import annotations

import random
import threading

import numpy as np
import pytest
from conftest import REAL_FAMILIES
import torch
from rapidfuzz.distance import Levenshtein
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import fusion.vocab_map as vocab_map
from fusion.vocab_map import BYTE_FALLBACK, DROPPED, EXACT, NEAREST, VocabMap



@pytest.fixture(scope="session")
def real(real_tokenizers) -> dict:
    return real_tokenizers


@pytest.fixture(scope="session")
def exact_maps(real) -> dict:
    """Exact-only maps (no nearest search, which the hand checks below do not need)."""
    pairs = [("gpt2", "mistral-v1"), ("gpt2", "gemma3"), ("gpt2", "minilm-wordpiece"), ("gpt2", "smollm2"),
             ("mistral-v1", "gpt2"), ("minilm-wordpiece", "gpt2"), ("gemma3", "mistral-v1"), ("smollm2", "gpt2")]
    return {(s, t): VocabMap.build(real[s], real[t], len(real[s]), max_edits=0) for s, t in pairs}


def _id(tokenizer, token: str) -> int:
    index = tokenizer.convert_tokens_to_ids(token)
    assert index is not None and tokenizer.convert_ids_to_tokens(index) == token, token
    return index


def _maps_to(maps, real, source: str, target: str, source_token: str, target_token: str | None, kind: int):
    mapping = maps[source, target]
    index = _id(real[source], source_token)
    assert mapping.kind[index] == kind, (source_token, mapping.kind[index])
    expected = -1 if target_token is None else _id(real[target], target_token)
    assert mapping.source_to_target[index] == expected, (source_token, target_token)


@pytest.mark.parametrize("family", REAL_FAMILIES)
def test_identical_tokenizers_map_to_the_identity(real, family):
    tok = real[family]
    mapping = VocabMap.build(tok, tok, len(tok))
    assert mapping.source_to_target.tolist() == list(range(len(tok)))
    assert mapping.coverage() == {"exact": len(tok), "byte_fallback": 0, "nearest": 0, "dropped": 0}


def test_word_tokens_match_across_families(real, exact_maps):
    # " the": byte-level Ġ, SentencePiece ▁, word-initial WordPiece.
    for target, token in (("mistral-v1", "▁the"), ("gemma3", "▁the"), ("minilm-wordpiece", "the"), ("smollm2", "Ġthe")):
        _maps_to(exact_maps, real, "gpt2", target, "Ġthe", token, EXACT)
    # Inside a word: no space on either side; a WordPiece continuation.
    _maps_to(exact_maps, real, "gpt2", "mistral-v1", "ing", "ing", EXACT)
    _maps_to(exact_maps, real, "gpt2", "minilm-wordpiece", "ing", "##ing", EXACT)
    # The uncased WordPiece target sees " The" as " the"; punctuation stays attached.
    _maps_to(exact_maps, real, "gpt2", "minilm-wordpiece", "ĠThe", "the", EXACT)
    _maps_to(exact_maps, real, "gpt2", "minilm-wordpiece", ",", ",", EXACT)
    # And back from WordPiece.
    _maps_to(exact_maps, real, "minilm-wordpiece", "gpt2", "the", "Ġthe", EXACT)
    _maps_to(exact_maps, real, "minilm-wordpiece", "gpt2", "##ing", "ing", EXACT)
    _maps_to(exact_maps, real, "minilm-wordpiece", "gpt2", ",", ",", EXACT)
    _maps_to(exact_maps, real, "mistral-v1", "gpt2", "▁the", "Ġthe", EXACT)
    _maps_to(exact_maps, real, "gemma3", "mistral-v1", "▁the", "▁the", EXACT)


def test_byte_tokens(real, exact_maps):
    # A newline: Mistral spells it with a byte-fallback token, Gemma has a regular (added) token.
    _maps_to(exact_maps, real, "gpt2", "mistral-v1", "Ċ", "<0x0A>", EXACT)
    _maps_to(exact_maps, real, "gpt2", "gemma3", "Ċ", "\n", EXACT)
    _maps_to(exact_maps, real, "gpt2", "gemma3", "ĊĊ", "\n\n", EXACT)
    _maps_to(exact_maps, real, "mistral-v1", "gpt2", "<0x0A>", "Ċ", EXACT)
    # The lone byte 0xF0 (first byte of a 4-byte character) is the same byte on both sides.
    _maps_to(exact_maps, real, "gpt2", "mistral-v1", "ð", "<0xF0>", EXACT)
    _maps_to(exact_maps, real, "mistral-v1", "gpt2", "<0xF0>", "ð", EXACT)
    # The first three bytes of an emoji map to the target's first byte-fallback token ...
    _maps_to(exact_maps, real, "gpt2", "mistral-v1", "ðŁĺ", "<0xF0>", BYTE_FALLBACK)
    _maps_to(exact_maps, real, "gpt2", "gemma3", "ðŁĺ", "<0xF0>", BYTE_FALLBACK)
    # ... and to nothing in WordPiece, which has no bytes.
    _maps_to(exact_maps, real, "gpt2", "minilm-wordpiece", "ðŁĺ", None, DROPPED)
    _maps_to(exact_maps, real, "gpt2", "minilm-wordpiece", "Ċ", None, DROPPED)


def test_special_tokens(real, exact_maps):
    _maps_to(exact_maps, real, "gpt2", "mistral-v1", "<|endoftext|>", "</s>", EXACT)  # EOS to EOS
    _maps_to(exact_maps, real, "gpt2", "gemma3", "<|endoftext|>", "<eos>", EXACT)
    _maps_to(exact_maps, real, "gemma3", "mistral-v1", "<bos>", "<s>", EXACT)  # BOS to BOS
    _maps_to(exact_maps, real, "smollm2", "gpt2", "<|endoftext|>", "<|endoftext|>", EXACT)  # same content
    _maps_to(exact_maps, real, "minilm-wordpiece", "gpt2", "[CLS]", None, DROPPED)  # no BOS role
    _maps_to(exact_maps, real, "gemma3", "mistral-v1", "<start_of_turn>", None, DROPPED)


def test_padded_vocabulary_and_map_topk(real):
    source, target = real["gpt2"], real["mistral-v1"]
    padded = len(source) + 47
    mapping = VocabMap.build(source, target, padded, max_edits=0)
    assert mapping.source_to_target.shape == (padded,)
    assert (mapping.source_to_target[len(source):] == -1).all()
    assert (mapping.kind[len(source):] == DROPPED).all()
    assert sum(mapping.coverage().values()) == padded

    the, padding_id = _id(source, "Ġthe"), len(source) + 3
    expected = np.asarray([[_id(target, "▁the"), 0]])
    indices, dropped = mapping.map_topk(np.asarray([[the, padding_id]]))
    assert indices.dtype == np.int32 and indices.tolist() == expected.tolist()
    assert dropped.tolist() == [[False, True]]
    indices, dropped = mapping.map_topk(torch.tensor([[the, padding_id]]))
    assert indices.dtype == torch.int32 and indices.tolist() == expected.tolist()
    assert dropped.tolist() == [[False, True]]
    with pytest.raises(ValueError, match="source ids"):
        mapping.map_topk(np.asarray([padded]))
    with pytest.raises(ValueError, match="source ids"):
        mapping.map_topk(torch.tensor([-1]))
    with pytest.raises(ValueError, match="logits size"):
        VocabMap.build(source, target, len(source) - 1)


def test_cache_reload_gives_identical_arrays(real, tmp_path, monkeypatch):
    source, target = real["minilm-wordpiece"], real["mistral-v1"]
    built = VocabMap.build(source, target, len(source) + 5, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("vocab_map-*.npz"))) == 1

    def no_rebuild(*args):
        raise AssertionError("a cached map was rebuilt")

    monkeypatch.setattr(vocab_map, "spell_vocabulary", no_rebuild)
    loaded = VocabMap.build(source, target, len(source) + 5, cache_dir=tmp_path)
    np.testing.assert_array_equal(loaded.source_to_target, built.source_to_target)
    np.testing.assert_array_equal(loaded.kind, built.kind)
    assert loaded.source_to_target.dtype == np.int32
    monkeypatch.undo()
    # Other settings, another entry.
    VocabMap.build(source, target, len(source) + 5, cache_dir=tmp_path, max_edits=0)
    assert len(list(tmp_path.glob("vocab_map-*.npz"))) == 2


def test_threads_building_one_map_at_once_share_the_cache(real, tmp_path, monkeypatch):
    """Ranks run as threads of one process (as in the precompute test) write the same cache file together."""
    source, target = real["gpt2"], real["smollm2"]
    reference = VocabMap.build(source, target, len(source))
    threads = 4
    everyone_mapped = threading.Barrier(threads)
    build_nearest = vocab_map._map_nearest

    def nearest_then_wait(*args):
        build_nearest(*args)
        everyone_mapped.wait(timeout=120)  # all threads reach the cache write together

    monkeypatch.setattr(vocab_map, "_map_nearest", nearest_then_wait)
    results, errors = [], []

    def build():
        try:
            results.append(VocabMap.build(source, target, len(source), cache_dir=tmp_path))
        except Exception as error:  # re-raised in the main thread below
            errors.append(error)

    workers = [threading.Thread(target=build) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    assert len(results) == threads
    for result in results:
        np.testing.assert_array_equal(result.source_to_target, reference.source_to_target)
        np.testing.assert_array_equal(result.kind, reference.kind)
    # One finished entry and no half-written leftovers.
    assert [path.name for path in tmp_path.iterdir()] == [path.name for path in tmp_path.glob("vocab_map-*.npz")]
    assert len(list(tmp_path.iterdir())) == 1


# --- nearest matches against brute force ----------------------------------------------------------

def _gpt2_byte_alphabet() -> dict[int, str]:
    visible = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {b: chr(b) for b in visible}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def _byte_level_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer whose vocabulary is exactly ``words`` (spelled in GPT-2's byte alphabet)."""
    alphabet = _gpt2_byte_alphabet()
    vocab = {"".join(alphabet[b] for b in word.encode()): i for i, word in enumerate(words)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _brute_force_nearest(source_words, target_words, cutoff, max_edits):
    expected = []
    for word in source_words:
        if word in target_words:
            expected.append((target_words.index(word), EXACT))
            continue
        best = None
        for index, candidate in enumerate(target_words):
            distance = Levenshtein.distance(word, candidate)
            if distance <= max_edits and distance <= cutoff * max(len(word), len(candidate)) + 1e-9:
                if best is None or distance < best[0]:
                    best = (distance, index)
        expected.append((best[1], NEAREST) if best else (-1, DROPPED))
    return expected


@pytest.mark.parametrize(("cutoff", "max_edits"), [(1 / 3, 1), (1 / 3, 2), (0.5, 2), (0.2, 3)])
def test_nearest_matches_brute_force(cutoff, max_edits):
    rng = random.Random(7)
    letters = "abcdé "

    def words(count):
        drawn = set()
        while len(drawn) < count:
            drawn.add("".join(rng.choice(letters) for _ in range(rng.randint(1, 9))))
        return sorted(drawn)

    source_words, target_words = words(211), words(307)
    mapping = VocabMap.build(_byte_level_tokenizer(source_words), _byte_level_tokenizer(target_words),
                             len(source_words), max_normalized_distance=cutoff, max_edits=max_edits)
    expected = _brute_force_nearest(source_words, target_words, cutoff, max_edits)
    assert list(zip(mapping.source_to_target.tolist(), mapping.kind.tolist())) == expected
    assert mapping.coverage()["nearest"] > 10


def test_unknown_family_is_rejected():
    tok = Tokenizer(models.WordLevel(vocab={"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok)
    with pytest.raises(ValueError, match="supported families"):
        VocabMap.build(wrapped, wrapped, len(wrapped))
    with pytest.raises(ValueError, match="max_normalized_distance"):
        VocabMap.build(wrapped, wrapped, len(wrapped), max_normalized_distance=1.5)
