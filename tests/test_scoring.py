"""Source scoring: top-k and gold NLL against dense references, alignment wiring, chunking.

Tiny tokenizers are trained in-test with the ``tokenizers`` library and tiny random Llama
models give the logits; each model's vocabulary is wider than its tokenizer (padded
vocabulary), so ids the tokenizer does not know appear among the candidates.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from alignment_reference import reference_boundaries
from fusion.sources.scoring import SourceScorer, encode_with_offsets, next_token_topk
from fusion.vocab_map import VocabMap

TRAINING_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé text: naïve café, 東京 and emoji 🙂!",
    "def double(x):\n    return x * 2  # twice",
    "Numbers 12345 and 3.14159 appear here, then words again.",
] * 3

TEXTS = [
    "The lazy fox jumps over the quick dog again.",
    "naïve café 🙂 and 東京",
    "def f(x):\n    return x",
    "Numbers 31 and 4.5 appear.",
    "Hi",
]


def byte_level_tokenizer(vocab_size: int, bos: bool) -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE; with ``bos`` a BOS token is prepended to every sequence."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        TRAINING_TEXTS,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<pad>", "<bos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        ),
    )
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>")


def metaspace_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE (``▁`` for spaces) adding BOS and EOS, with an unknown token."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        TRAINING_TEXTS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_llama(vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def toks():
    torch.set_num_threads(1)
    return {
        "bytes_bos": byte_level_tokenizer(301, bos=True),
        "bytes_plain": byte_level_tokenizer(263, bos=False),
        "metaspace": metaspace_tokenizer(157),
    }


def dense_reference(model, tokenizer, text: str) -> tuple[torch.Tensor, list[int], list[tuple[int, int]], list[int]]:
    """Full-vocabulary log-softmax ``[L, V]`` of one unpadded text, with its ids, offsets, special mask."""
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc["input_ids"]])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1), enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]


def expected_candidates(logprobs: torch.Tensor, source_to_target: np.ndarray, top_k: int):
    """Brute-force top-k of one position's dense log-probs, mapped as the answer convention says."""
    values, ids = torch.topk(logprobs, top_k)
    mapped = source_to_target[ids.numpy()]
    dropped = torch.from_numpy(mapped < 0)
    return torch.from_numpy(np.where(mapped < 0, 0, mapped)).int(), values.masked_fill(dropped, float("-inf")), dropped


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_next_token_topk_matches_dense_reference(temperature):
    torch.manual_seed(0)
    batch, length, vocab, k = 3, 13, 97, 7
    logits = torch.randn(batch, length, vocab) * 3
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, 9:] = 0
    attention_mask[2, 4:] = 0
    next_ids = torch.randint(0, vocab, (batch, length))
    next_ids[0, -1] = -100
    next_ids[1, 3] = -100
    lp, ids, gold = next_token_topk(logits, attention_mask, next_ids, k, temperature, chunk_rows=4)

    dense = torch.log_softmax(logits / temperature, dim=-1)
    ref_values, ref_ids = torch.topk(dense, k)
    dense_t1 = torch.log_softmax(logits, dim=-1)
    real = attention_mask.bool()
    torch.testing.assert_close(lp[real], ref_values[real])
    assert torch.equal(ids[real], ref_ids[real])
    assert torch.isinf(lp[~real]).all()
    scored = real & (next_ids >= 0)
    ref_gold = dense_t1.gather(2, next_ids.clamp(min=0)[..., None]).squeeze(2)
    torch.testing.assert_close(gold[scored], ref_gold[scored])
    assert (gold[~scored] == 0).all()

    unchunked = next_token_topk(logits, attention_mask, next_ids, k, temperature, chunk_rows=10_000)
    for a, b in zip((lp, ids, gold), unchunked):
        assert torch.equal(a, b)


def test_next_token_topk_rejects_k_wider_than_vocab():
    logits = torch.zeros(1, 3, 5)
    with pytest.raises(ValueError, match="top_k"):
        next_token_topk(logits, torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.long), 6)


@pytest.mark.parametrize("name", ["bytes_bos", "bytes_plain", "metaspace"])
def test_identity_tokenizer_keeps_candidates(toks, name):
    """Source tokenizer = target tokenizer: candidates are the source's own top-k at the same
    position (ids beyond the tokenizer, from the padded vocabulary, dropped), and every position
    is valid except the last, padding, and those whose next token starts no boundary of the text
    (a special token, the unknown token, a piece inside a character: multi-byte characters split into
    byte-level tokens, SentencePiece's lone dummy-prefix ``▁``), by the brute-force reference of
    tests/alignment_reference.py, which reads no offsets."""
    tok = toks[name]
    vocab = len(tok) + 10
    model = tiny_llama(vocab, seed=1)
    vocab_map = VocabMap.build(tok, tok, vocab)
    k = 5
    answer = SourceScorer(model, tok, tok, vocab_map, top_k=k, dtype=torch.float32).score(TEXTS)
    known = np.full(vocab, -1, dtype=np.int64)
    known[: len(tok)] = np.arange(len(tok))
    for row, text in enumerate(TEXTS):
        dense, ids, offsets, special = dense_reference(model, tok, text)
        family, dummy = ("sentencepiece", "unless_space") if name == "metaspace" else ("byte_level", None)
        starts_boundary = [start is not None for start, _ in reference_boundaries(tok, family, dummy, ids, text)]
        expected_valid = torch.zeros(answer.length, dtype=torch.bool)
        expected_valid[: len(ids) - 1] = torch.tensor(starts_boundary[1:])
        assert torch.equal(answer.valid[row], expected_valid)
        if text.isascii() and name.startswith("bytes"):
            assert answer.valid[row, : len(ids) - 1].all()
        for t in torch.nonzero(answer.valid[row]).flatten().tolist():
            ref_ids, ref_lp, _ = expected_candidates(dense[t], known, k)
            assert torch.equal(answer.indices[row, t], ref_ids)
            torch.testing.assert_close(answer.logprobs[row, t].double(), ref_lp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["bytes_bos", "bytes_plain", "metaspace"])
def test_nll_matches_dense_reference(toks, name):
    tok = toks[name]
    model = tiny_llama(len(tok) + 4, seed=2)
    scorer = SourceScorer(model, tok, toks["bytes_plain"], VocabMap.build(tok, toks["bytes_plain"], len(tok) + 4))
    answer = scorer.score(TEXTS)
    for row, text in enumerate(TEXTS):
        dense, ids, offsets, special = dense_reference(model, tok, text)
        # Every non-special token after the first position is predicted; BOS never is.
        nats = -sum(float(dense[j - 1, ids[j]]) for j in range(1, len(ids)) if not special[j])
        count = sum(1 for j in range(1, len(ids)) if not special[j])
        first_text = next(j for j in range(len(ids)) if not special[j])
        # Without BOS the first text token is never predicted, so its characters are not counted.
        covered = text if first_text > 0 else text[offsets[first_text][1] :]
        assert answer.nll_per_token[row].item() == pytest.approx(nats / count, rel=1e-5)
        assert answer.nll_per_byte[row].item() == pytest.approx(nats / len(covered.encode("utf-8")), rel=1e-5)


@pytest.mark.parametrize("source, target", [("metaspace", "bytes_plain"), ("bytes_bos", "metaspace"), ("bytes_plain", "bytes_bos")])
def test_cross_tokenizer_answers_come_from_a_shared_boundary(toks, source, target):
    """Each valid target position holds the mapped top-k of a source position whose next token
    starts where the target's next token starts (checked by brute force over source positions)."""
    src, tgt = toks[source], toks[target]
    vocab = len(src) + 6
    model = tiny_llama(vocab, seed=3)
    vocab_map = VocabMap.build(src, tgt, vocab)
    k = 4
    _, target_offsets, _ = encode_with_offsets(tgt, TEXTS)
    answer = SourceScorer(model, src, tgt, vocab_map, top_k=k, dtype=torch.float32).score(TEXTS, target_offsets, length=41)
    assert answer.length == 41 and answer.valid.any()
    for row, text in enumerate(TEXTS):
        dense, _, src_offsets, src_special = dense_reference(model, src, text)
        assert not answer.valid[row, len(target_offsets[row]) - 1 :].any()
        for t in torch.nonzero(answer.valid[row]).flatten().tolist():
            start = target_offsets[row][t + 1][0]
            candidates = [
                j for j in range(len(src_offsets) - 1)
                if not src_special[j + 1] and src_offsets[j + 1][0] == start
            ]
            matches = []
            for j in candidates:
                ref_ids, ref_lp, dropped = expected_candidates(dense[j], vocab_map.source_to_target, k)
                same = torch.equal(answer.indices[row, t], ref_ids) and torch.allclose(
                    answer.logprobs[row, t].double(), ref_lp, atol=1e-4
                )
                matches.append(same and not dropped.all())
            assert any(matches), f"row {row} position {t}: no source position with a shared boundary matches"


def test_chunked_and_unchunked_scoring_are_identical(toks):
    tok, tgt = toks["metaspace"], toks["bytes_bos"]
    model = tiny_llama(len(tok) + 3, seed=4)
    vocab_map = VocabMap.build(tok, tgt, len(tok) + 3)
    small = SourceScorer(model, tok, tgt, vocab_map, top_k=6, chunk_rows=3).score(TEXTS)
    large = SourceScorer(model, tok, tgt, vocab_map, top_k=6, chunk_rows=4096).score(TEXTS)
    for name in ("indices", "logprobs", "valid", "nll_per_token", "nll_per_byte"):
        assert torch.equal(getattr(small, name), getattr(large, name)), name


def test_scorer_rejects_a_vocab_map_of_another_width(toks):
    tok = toks["bytes_bos"]
    model = tiny_llama(len(tok) + 2, seed=5)
    vocab_map = VocabMap.build(tok, tok, len(tok))
    with pytest.raises(ValueError, match="source_vocab_size"):
        SourceScorer(model, tok, tok, vocab_map).score(TEXTS[:2])


def test_scorer_rejects_a_model_without_logits(toks):
    tok = toks["bytes_bos"]
    vocab_map = VocabMap.build(tok, tok, len(tok))
    with pytest.raises(ValueError, match="logits"):
        SourceScorer(lambda **_: {"hidden": 0}, tok, tok, vocab_map).score(TEXTS[:2])
