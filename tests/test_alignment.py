"""Alignment of target positions to source positions (fusion.alignment).

The fast alignment is compared exactly with a brute-force reference written here from the rules
(plain loops over character spans), on random texts and every ordered pair of tokenizers: the five
real families from ``assets/tokenizers`` and small tokenizers trained in the test.
"""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fusion.alignment import align_next_token_positions, token_starts
from fusion.vocab_map import VocabMap


TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!",
    "In 1999, 42 cats and 7 dogs lived in a house at 221B Baker Street.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Café, naïve façade: déjà vu. Straße und Übermut. İstanbul ﬁx.",
    "東京は日本の首都です。北京是中国的首都。",
    "Emoji time 😀 👍🏽 🇫🇷 and 👨‍👩‍👧 family.",
    "Tabs\tand  double  spaces\n\n  and indented lines.",
] * 3


# --- reference: the rules of fusion.alignment written as plain loops over character spans -------

def reference_starts(offsets, text):
    """Start character of each token's boundary, None where it starts none."""
    spans = [(int(s), int(e)) for s, e in offsets]
    covered = [False] * len(text)
    for s, e in spans:
        for c in range(s, e):
            covered[c] = True
    result = []
    for k, (s, e) in enumerate(spans):
        if e <= s:
            result.append(None)
            continue
        if any(e2 > s for s2, e2 in spans[:k] if e2 > s2):
            result.append(None)  # inside a character an earlier token began
            continue
        if s > 0 and text[s - 1].isspace() and not covered[s - 1]:
            s -= 1
        result.append(s)
    return result


def reference_alignment(source_offsets, target_offsets, text):
    source = reference_starts(source_offsets, text)
    target = reference_starts(target_offsets, text)
    result = []
    for t in range(len(target)):
        aligned = -1
        if t + 1 < len(target) and target[t + 1] is not None:
            for k in range(1, len(source)):
                if source[k] == target[t + 1]:
                    aligned = k - 1
        result.append(aligned)
    return result


# --- tokenizers -----------------------------------------------------------------------------------

def _wrap(tokenizer: Tokenizer, **special) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)


def _trained_byte_level(trim_offsets: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    tok.train_from_iterator(TRAINING_TEXT, trainers.BpeTrainer(
        vocab_size=499, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|end|>"],
        show_progress=False))
    return _wrap(tok, eos_token="<|end|>")


def _trained_sentencepiece_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(TRAINING_TEXT, trainers.BpeTrainer(vocab_size=311, special_tokens=["<unk>", "<s>", "</s>"],
                                                               show_progress=False))
    # Byte-fallback tokens are ordinary vocabulary entries, as in SentencePiece models.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return _wrap(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _trained_unigram() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(TRAINING_TEXT, trainers.UnigramTrainer(vocab_size=233, special_tokens=["<unk>"],
                                                                   unk_token="<unk>", show_progress=False))
    return _wrap(tok, unk_token="<unk>")


def _trained_wordpiece() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(TRAINING_TEXT, trainers.WordPieceTrainer(
        vocab_size=257, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return _wrap(tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]")


@pytest.fixture(scope="session")
def trained_tokenizers() -> dict:
    return {
        "bytelevel": _trained_byte_level(trim_offsets=False),
        "bytelevel-trimmed": _trained_byte_level(trim_offsets=True),
        "sp-bpe": _trained_sentencepiece_bpe(),
        "unigram": _trained_unigram(),
        "wordpiece": _trained_wordpiece(),
    }


@pytest.fixture(scope="session")
def alignment_tokenizers(real_tokenizers, tokenizer_dirs) -> dict:
    # GPT-2 as it would be with the trimming post-processor (Hugging Face RoBERTa-style configs).
    trimmed = AutoTokenizer.from_pretrained(tokenizer_dirs["gpt2"])
    trimmed.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    return {**real_tokenizers, "gpt2-trimmed": trimmed}


def _offsets(tokenizer, text):
    return tokenizer(text, return_offsets_mapping=True)["offset_mapping"]


# --- texts ----------------------------------------------------------------------------------------

_PIECES = st.one_of(
    st.sampled_from(["the", "The", "quick", "fox", "jumps", "dog", "over", "return", "print", "house", "a", "I"]),
    st.sampled_from([" ", " ", " ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "\r\n", "\u00a0", "\u3000"]),
    st.sampled_from([".", ",", "!", "?", ";", ":", "(", ")", "'", '"', "-", "—", "…", "«", "»", "#", "$", "@"]),
    st.from_regex(r"[0-9]{1,7}", fullmatch=True),
    st.sampled_from(["café", "naïve", "façade", "déjà", "Straße", "Übermut", "İstanbul", "ﬁx", "Ωmega", "ñandú"]),
    st.sampled_from(["東京", "日本", "首都", "北京", "中国", "。", "、", "한국어", "ภาษาไทย", "हिन्दी"]),
    st.sampled_from(["😀", "👍🏽", "🇫🇷", "👨‍👩‍👧", "❤️", "🙂🙂", "e\u0301", "\u200b"]),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=4),
)
TEXTS = st.lists(_PIECES, min_size=1, max_size=30).map("".join)


# --- tests ----------------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_matches_reference_for_trained_tokenizers(trained_tokenizers, text):
    offsets = {name: _offsets(tok, text) for name, tok in trained_tokenizers.items()}
    for source, target in itertools.permutations(offsets, 2):
        expected = reference_alignment(offsets[source], offsets[target], text)
        got = align_next_token_positions(offsets[source], offsets[target], text)
        assert got.tolist() == expected, (source, target)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_matches_reference_for_real_tokenizers(alignment_tokenizers, text):
    offsets = {name: _offsets(tok, text) for name, tok in alignment_tokenizers.items()}
    for source, target in itertools.permutations(offsets, 2):
        expected = reference_alignment(offsets[source], offsets[target], text)
        got = align_next_token_positions(offsets[source], offsets[target], text)
        assert got.tolist() == expected, (source, target)


def _assert_identity(tokenizers: dict):
    text = "The quick brown fox, 31 years old, jumps over 7 lazy dogs.\n\nThen it  sleeps\tquietly!"
    for name, tok in tokenizers.items():
        offsets = np.asarray(_offsets(tok, text))
        aligned = align_next_token_positions(offsets, offsets, text)
        # ASCII text: every token but special (zero-width) ones starts a boundary.
        next_is_text = np.append(offsets[1:, 1] > offsets[1:, 0], False)
        expected = np.where(next_is_text, np.arange(len(offsets)), -1)
        assert aligned.tolist() == expected.tolist(), name
        assert aligned[-1] == -1


def test_identical_trained_tokenizers_align_every_position_to_itself(trained_tokenizers):
    _assert_identity(trained_tokenizers)


def test_identical_real_tokenizers_align_every_position_to_itself(alignment_tokenizers):
    _assert_identity(alignment_tokenizers)


def test_hand_checked_bytelevel_and_wordpiece(alignment_tokenizers):
    text = "Hello  world, 123"
    gpt2 = _offsets(alignment_tokenizers["gpt2"], text)  # Hello | Ġ | Ġworld | , | Ġ123
    minilm = _offsets(alignment_tokenizers["minilm-wordpiece"], text)  # [CLS] hello world , 123 [SEP]
    assert token_starts(gpt2, text).tolist() == [0, 5, 6, 12, 13]
    # WordPiece drops the whitespace: "world" and "123" take the uncovered space before them.
    assert token_starts(minilm, text).tolist() == [-1, 0, 6, 12, 13, -1]
    # GPT-2 has no BOS, so nothing predicts "hello"; "Ġ" predicts "Ġworld"; nothing follows "123".
    assert align_next_token_positions(gpt2, minilm, text).tolist() == [-1, 1, 2, 3, -1, -1]
    # [CLS] predicts "hello", which GPT-2 position 0 never needs: it predicts the lone space.
    assert align_next_token_positions(minilm, gpt2, text).tolist() == [-1, 1, 2, 3, -1]


def test_hand_checked_bos_on_one_side_only(alignment_tokenizers):
    text = "Hello  world"
    gemma = _offsets(alignment_tokenizers["gemma3"], text)  # <bos> Hello ▁▁ world
    smollm = _offsets(alignment_tokenizers["smollm2"], text)  # Hello Ġ Ġworld
    assert token_starts(gemma, text).tolist() == [-1, 0, 5, 7]
    assert align_next_token_positions(smollm, gemma, text).tolist() == [-1, 0, -1, -1]
    assert align_next_token_positions(gemma, smollm, text).tolist() == [1, -1, -1]
    # With a BOS on both sides, the BOS positions predict the first token together.
    mistral = _offsets(alignment_tokenizers["mistral-v1"], text)  # <s> ▁Hello ▁ ▁world
    assert align_next_token_positions(mistral, gemma, text).tolist() == [0, 1, -1, -1]


def test_trimmed_offsets_are_restored_or_dropped():
    text = "Hello  world"
    # GPT-2 with trim_offsets=True: the lone space shrinks to zero width, "Ġworld" loses its space.
    trimmed = [(0, 5), (6, 6), (7, 12)]
    assert token_starts(trimmed, text).tolist() == [0, -1, 6]
    untrimmed = [(0, 5), (5, 6), (6, 12)]
    # "Hello" predicts the zero-width space: invalid; the space predicts "Ġworld" at 6 on both sides.
    assert align_next_token_positions(untrimmed, trimmed, text).tolist() == [-1, 1, -1]


def test_pieces_of_one_character_start_no_boundary():
    text = "a😀b"
    # Byte-level pieces of the emoji, then a dummy-prefix-like token sharing the first span.
    assert token_starts([(0, 1), (1, 2), (1, 2), (1, 2), (2, 3)], text).tolist() == [0, 1, -1, -1, 2]
    assert token_starts([(0, 1), (0, 1), (1, 2), (2, 3)], text).tolist() == [0, -1, 1, 2]
    # A token reaching into the next character makes the following piece start inside it.
    assert token_starts([(0, 2), (1, 2), (2, 3)], text).tolist() == [0, -1, 2]


def test_padding_and_last_position_are_invalid():
    text = "ab cd"
    target = [(0, 2), (2, 5), (0, 0), (0, 0)]
    source = [(0, 0), (0, 1), (1, 2), (2, 5), (0, 0)]
    assert align_next_token_positions(source, target, text).tolist() == [2, -1, -1, -1]
    assert align_next_token_positions(source, [], text).tolist() == []
    assert align_next_token_positions(source, [(0, 2)], text).tolist() == [-1]


def test_rejects_offsets_that_do_not_fit_the_text():
    with pytest.raises(ValueError, match="not inside the text"):
        token_starts([(0, 3), (3, 9)], "short")
    with pytest.raises(ValueError, match="not inside the text"):
        token_starts([(2, 1)], "short")
    with pytest.raises(ValueError, match="shape"):
        token_starts([[(0, 1)], [(1, 2)]], "short")


def test_soft_label_predicts_the_token_after_t(trained_tokenizers):
    """FuseLLM's off-by-one (FuseAI issue 27): the label of target position t is about token t+1.

    The source "model" is a lookup table that puts all its mass on the true next source token. After
    alignment and vocabulary mapping, its argmax at every valid target position whose next tokens
    spell the same text on both sides must be target token t+1; using the distribution of the
    position aligned to token t itself would give token t (different here at every position).
    """
    source_tok, target_tok = trained_tokenizers["bytelevel"], trained_tokenizers["sp-bpe"]
    text = "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!"
    source = source_tok(text, return_offsets_mapping=True)
    target = target_tok(text, return_offsets_mapping=True)
    source_ids, target_ids = np.asarray(source["input_ids"]), np.asarray(target["input_ids"])

    vocab = len(source_tok) + 6  # padded logits
    logits = np.full((len(source_ids), vocab), -30.0, dtype=np.float32)
    logits[np.arange(len(source_ids) - 1), source_ids[1:]] = 0.0

    aligned = align_next_token_positions(source["offset_mapping"], target["offset_mapping"], text)
    mapping = VocabMap.build(source_tok, target_tok, vocab)
    checked = 0
    for t in np.flatnonzero(aligned >= 0):
        j = aligned[t]
        predicted, dropped = mapping.map_topk(np.asarray([logits[j].argmax()]))
        same_token = (source_tok.decode(source_ids[j + 1:j + 2]).replace(" ", "▁")
                      == target_tok.convert_ids_to_tokens(int(target_ids[t + 1])))
        if same_token:
            assert not dropped[0]
            assert predicted[0] == target_ids[t + 1], t
            assert target_ids[t + 1] != target_ids[t]
            checked += 1
    assert checked >= 10
