"""Vocabulary mapping between tokenizer families (fusion.vocab_map).

Exact matches are checked by hand on known tokens of the five real families; projections against
the target tokenizer itself encoding each source token's text (spelled by the reference of
tests/alignment_reference.py, not by fusion.vocab_map), and by the property that a projected target
token always spells a prefix of the source token (never a look-alike).
"""
from __future__ import annotations

import random
import threading

import numpy as np
import pytest
from alignment_reference import reference_spell
from conftest import REAL_FAMILIES
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import fusion.vocab_map as vocab_map
from fusion.assets.local_models import train_bpe_tokenizer
from fusion.vocab_map import BYTE_FALLBACK, DROPPED, EXACT, PROJECTED, VocabMap, spell_vocabulary

FAMILY = {"smollm2": "byte_level", "gemma3": "sentencepiece", "gpt2": "byte_level", "mistral-v1": "sentencepiece",
          "minilm-wordpiece": "wordpiece"}



@pytest.fixture(scope="session")
def real(real_tokenizers) -> dict:
    return real_tokenizers


@pytest.fixture(scope="session")
def exact_maps(real) -> dict:
    """Maps for the hand checks below."""
    pairs = [("gpt2", "mistral-v1"), ("gpt2", "gemma3"), ("gpt2", "minilm-wordpiece"), ("gpt2", "smollm2"),
             ("mistral-v1", "gpt2"), ("minilm-wordpiece", "gpt2"), ("gemma3", "mistral-v1"), ("smollm2", "gpt2")]
    return {(s, t): VocabMap.build(real[s], real[t], len(real[s])) for s, t in pairs}


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
    assert mapping.coverage() == {"exact": len(tok), "projected": 0, "byte_fallback": 0, "dropped": 0}


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
    mapping = VocabMap.build(source, target, padded)
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
    # Another algorithm version (a map cached by older code), another entry.
    monkeypatch.setattr(vocab_map, "ALGORITHM_VERSION", vocab_map.ALGORITHM_VERSION - 1)
    VocabMap.build(source, target, len(source) + 5, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("vocab_map-*.npz"))) == 2


def test_threads_building_one_map_at_once_share_the_cache(real, tmp_path, monkeypatch):
    """Ranks run as threads of one process (as in the precompute test) write the same cache file together."""
    source, target = real["gpt2"], real["smollm2"]
    reference = VocabMap.build(source, target, len(source))
    threads = 4
    everyone_mapped = threading.Barrier(threads)
    build_projected = vocab_map._map_projected

    def projected_then_wait(*args):
        build_projected(*args)
        everyone_mapped.wait(timeout=120)  # all threads reach the cache write together

    monkeypatch.setattr(vocab_map, "_map_projected", projected_then_wait)
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


# --- projection against the target tokenizer itself -----------------------------------------------

@pytest.fixture(scope="session")
def byte_level_target() -> PreTrainedTokenizerFast:
    """A small target tokenizer trained as the demo's target is (fusion.assets.local_models)."""
    texts = ["The quick brown fox jumps over the lazy dog in 2019 and 2020.", "def f(x):\n    return x + 201",
             "Café naïve 東京 🙂 turn turnkey turning returns"] * 20
    return train_bpe_tokenizer(texts, 400)


@pytest.mark.parametrize("source_name", ["gpt2", "mistral-v1", "minilm-wordpiece", "smollm2"])
def test_projection_is_the_targets_first_token(real, byte_level_target, source_name):
    """Every source id whose text the reference spells maps to what the target emits first for that
    text (encoded on its own, no special tokens): the exact token where one spells the same text."""
    source, target = real[source_name], byte_level_target
    mapping = VocabMap.build(source, target, len(source))
    target_vocab = {surface: index for index, surface in enumerate(spell_vocabulary(target).surfaces) if surface}
    rng = random.Random(0)
    checked = 0
    for index in rng.sample(range(len(source)), 600):
        surface, unknown, _ = reference_spell(source, FAMILY[source_name], index)
        if surface is None or unknown:
            assert mapping.kind[index] in (DROPPED, EXACT)  # special tokens: only to target specials
            continue
        try:
            text = surface.decode()
        except UnicodeDecodeError:
            assert mapping.kind[index] in (BYTE_FALLBACK, DROPPED, EXACT)
            continue
        first = target(text, add_special_tokens=False)["input_ids"][0]
        expected = target_vocab.get(surface, first)
        assert mapping.source_to_target[index] == expected, (source.convert_ids_to_tokens(index), text)
        checked += 1
    assert checked > 400


@pytest.mark.parametrize(("source_name", "target_name"), [("gpt2", "mistral-v1"), ("smollm2", "gpt2"),
                                                          ("mistral-v1", "minilm-wordpiece")])
def test_projected_tokens_spell_a_prefix_of_the_source_token(real, source_name, target_name):
    """Never a look-alike: a projected target token spells the start of the source token's text
    (in the target's normal form), at every space shift."""
    source, target = real[source_name], real[target_name]
    mapping = VocabMap.build(source, target, len(source))
    fold = spell_vocabulary(target).fold
    drops_whitespace = spell_vocabulary(target).family == "wordpiece"
    target_surfaces = spell_vocabulary(target).surfaces
    source_surfaces = spell_vocabulary(source).surfaces
    for row, shift in enumerate(vocab_map.SPACE_SHIFTS):
        projected = np.flatnonzero(mapping.kinds[row] == PROJECTED)
        assert projected.size > 100
        for index in projected[:: max(1, projected.size // 1000)]:
            surface = vocab_map.shifted_surface(source_surfaces[index], shift).decode()
            spelled = target_surfaces[mapping.tables[row, index]]  # bytes: may be a piece of a character
            wanted = (fold.normalize_str(surface) if fold is not None else surface).encode()
            if drops_whitespace:  # whitespace is only a word break to it
                wanted, spelled = wanted.lstrip(), spelled.lstrip()
            assert wanted.startswith(spelled), \
                (shift, source.convert_ids_to_tokens(int(index)), spelled)


def test_projection_examples(real, byte_level_target):
    """Edit distance mapped " turnkey" to " turkey"; the projection maps " turnover" to the target's
    " turn", the token the target begins that text with."""
    mapping = VocabMap.build(real["gpt2"], byte_level_target, len(real["gpt2"]))
    turnkey = _id(real["gpt2"], "Ġturnover")
    assert byte_level_target.convert_ids_to_tokens(int(mapping.source_to_target[turnkey])) == "Ġturn"
    assert mapping.kind[turnkey] == PROJECTED
    # Space shifts: one space less (a source's dummy prefix the text lacks), one more.
    the = _id(real["gpt2"], "Ġthe")
    shifts = mapping.map_topk(np.asarray([[the], [the], [the]]), np.asarray([0, -1, 1]))[0].ravel().tolist()
    assert byte_level_target.convert_ids_to_tokens(shifts) == ["Ġthe", "the", "Ġ"]
    with pytest.raises(ValueError, match="space_shift"):
        mapping.map_topk(np.asarray([the]), 2)


def test_unknown_family_is_rejected():
    tok = Tokenizer(models.WordLevel(vocab={"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok)
    with pytest.raises(ValueError, match="supported families"):
        VocabMap.build(wrapped, wrapped, len(wrapped))
