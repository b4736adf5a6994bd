"""Source scoring: top-k and gold NLL against dense references, alignment wiring, chunking.

Tiny tokenizers are trained in-test with the ``tokenizers`` library and tiny random Llama
models give the logits; each model's vocabulary is wider than its tokenizer (padded
vocabulary), so ids the tokenizer does not know appear among the candidates.
"""
from __future__ import annotations

from types import SimpleNamespace

import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from alignment_reference import facts, reference_boundaries, reference_spell
from fusion.alignment import INSIDE
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
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True, split_special_tokens=True)
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


FAMILIES = {"bytes_bos": ("byte_level", None), "bytes_plain": ("byte_level", None),
            "metaspace": ("sentencepiece", "unless_space")}


_SPELLED: dict = {}


def _spelled(tokenizer, family: str, vocab: int) -> list:
    """Every id's bytes by the reference's spelling (None beyond the tokenizer), once per tokenizer."""
    key = (id(tokenizer), vocab)
    if key not in _SPELLED:
        _SPELLED[key] = ([reference_spell(tokenizer, family, i)[0] for i in range(min(vocab, len(tokenizer)))]
                         + [None] * max(vocab - len(tokenizer), 0), tokenizer)
    return _SPELLED[key][0]


def _reference_labels(model, src, tgt, src_family, tgt_family, text, vocab_map, k):
    """Brute force from dense log-probs and spellings (no offsets): ({target position: (ids, logprobs)},
    the positions labelled from inside a source token).

    ``src_family``/``tgt_family`` are ``(family, dummy prefix rule)`` for the reference. Aligned: the
    source position whose next token starts where the target's next token starts (both without
    virtual spaces), top-k mapped by the vocabulary map. Inside: the target's next token starts at c
    inside source token m; among *all* ids of the source's vocabulary, those that spell
    text[start_m:c] and more, with the dense log-probs of position m - 1 renormalised over them, the
    k most probable, their remainder encoded by the target tokenizer (first token; a piece of a
    character is dropped). In both, where the source's own token spells a proper prefix of the
    target's next token, candidates that do too map to that token.
    """
    dense, src_ids, _, _ = dense_reference(model, src, text)
    tgt_ids = tgt(text, split_special_tokens=True)["input_ids"]
    src_bounds = reference_boundaries(src, *src_family, src_ids, text)
    tgt_bounds = reference_boundaries(tgt, *tgt_family, tgt_ids, text)
    spelled = _spelled(src, src_family[0], dense.shape[-1])
    spell_tgt = lambda i: reference_spell(tgt, tgt_family[0], i)[0]  # noqa: E731
    labels, inside = {}, set()
    for t in range(len(tgt_ids) - 1):
        c, virtual = tgt_bounds[t + 1]
        if c is None or virtual:
            continue
        gold_id, gold = tgt_ids[t + 1], spell_tgt(tgt_ids[t + 1])
        less = lambda s: bool(s) and bool(gold) and len(s) < len(gold) and gold.startswith(s)  # noqa: E731
        same = [j for j in range(1, len(src_ids)) if src_bounds[j][0] == c]
        if same:
            j = same[0]
            if src_bounds[j][1]:
                continue
            values, cand = torch.topk(dense[j - 1], k)
            mapped = vocab_map.source_to_target[cand.numpy()].astype(np.int64)
            if less(spelled[src_ids[j]]):
                mapped = np.where([less(spelled[int(i)]) for i in cand], gold_id, mapped)
            labels[t] = (mapped, values)
            continue
        before = [j for j in range(1, len(src_ids)) if src_bounds[j][0] is not None and src_bounds[j][0] < c]
        if not before or src_bounds[before[-1]][1]:
            continue
        m = before[-1]
        seen = text[src_bounds[m][0]:c].encode()
        actual = spelled[src_ids[m]]
        if not actual or not actual.startswith(seen) or len(actual) <= len(seen):
            continue
        extending = [i for i, surface in enumerate(spelled)
                     if surface and len(surface) > len(seen) and surface.startswith(seen)]
        conditional = dense[m - 1, extending] - torch.logsumexp(dense[m - 1, extending], 0)
        values, slots = torch.topk(conditional, min(k, len(extending)))
        mapped, kept = np.full(k, -1, dtype=np.int64), np.zeros(k, dtype=bool)
        for slot, i in enumerate(extending[s] for s in slots.tolist()):
            remainder = spelled[i][len(seen):]
            try:
                encoded = tgt(remainder.decode(), add_special_tokens=False)["input_ids"]
            except UnicodeDecodeError:
                encoded = None  # a piece of a character
            if less(actual[len(seen):]) and less(remainder):
                mapped[slot], kept[slot] = gold_id, True
            elif encoded:
                mapped[slot], kept[slot] = encoded[0], True
        padded = torch.full((k,), float("-inf"), dtype=torch.float64)
        padded[: len(values)] = values
        if kept.any():
            labels[t] = (mapped, padded.masked_fill(~torch.from_numpy(kept), float("-inf")))
            inside.add(t)
    return labels, inside


class NextTokenOracle(torch.nn.Module):
    """A causal-LM stand-in that puts most of its mass on the true next token (it reads the whole
    input): its candidates then do extend what the target has seen inside a source token."""

    def __init__(self, vocab: int, seed: int):
        super().__init__()
        self.register_buffer("table", torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids, attention_mask=None):
        logits = self.table[input_ids].clone()
        logits[:, :-1].scatter_add_(2, input_ids[:, 1:, None], torch.full(input_ids[:, 1:, None].shape, 9.0))
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("source, target, coarser", [("bytes_bos", "bytes_plain", True), ("bytes_plain", "bytes_bos", False),
                                                     ("metaspace", "bytes_plain", True)])
def test_answers_match_a_brute_force_reference(toks, source, target, coarser):
    """Aligned and inside-source-token labels against _reference_labels, and every position with a
    label in the reference has one in the answer (and no other)."""
    src, tgt = toks[source], toks[target]
    vocab = len(src) + 6
    model = NextTokenOracle(vocab, seed=3)
    vocab_map = VocabMap.build(src, tgt, vocab)
    k = 4
    _, target_offsets, _ = encode_with_offsets(tgt, TEXTS)
    answer = SourceScorer(model, src, tgt, vocab_map, top_k=k, dtype=torch.float32).score(TEXTS, target_offsets, length=41)
    inside_positions = 0
    for row, text in enumerate(TEXTS):
        expected, inside = _reference_labels(model, src, tgt, FAMILIES[source], FAMILIES[target], text, vocab_map, k)
        expected = {t: v for t, v in expected.items() if (v[0] >= 0).any() and torch.isfinite(v[1]).any()}
        got = set(torch.nonzero(answer.valid[row]).flatten().tolist())
        assert got == set(expected), (row, sorted(got ^ set(expected)))
        for t, (ids, values) in expected.items():
            keep = (ids >= 0) & torch.isfinite(values).numpy()
            assert answer.indices[row, t][torch.from_numpy(keep)].tolist() == ids[keep].tolist(), (row, t)
            torch.testing.assert_close(answer.logprobs[row, t][torch.from_numpy(keep)].double(),
                                       values[torch.from_numpy(keep)], atol=1e-4, rtol=0)
        inside_positions += sum(1 for t in expected if t in inside)
    # A source with longer tokens than the target's leaves target boundaries inside its tokens.
    assert (inside_positions > 10) == coarser, inside_positions


class LowRankOracle(torch.nn.Module):
    """NextTokenOracle for real vocabularies (too wide for a V x V table): logits of the current token
    through a random rank-16 table, plus a bump on the true next token when its id is even. Where it
    is odd the source's own token is rarely among its unconditional top-k, so labels inside source
    tokens need candidates from the whole vocabulary."""

    def __init__(self, vocab: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("embed", torch.randn(vocab, 16, generator=generator))
        self.register_buffer("out", torch.randn(16, vocab, generator=generator))

    def forward(self, input_ids, attention_mask=None):
        logits = self.embed[input_ids] @ self.out
        following = input_ids[:, 1:, None]
        logits[:, :-1].scatter_add_(2, following, 9.0 * (following % 2 == 0).float())
        return SimpleNamespace(logits=logits)


_UNICODE_PIECES = ["the", " quick", " Straße", " naïve", " café", " İstanbul", " Ωmega", "ﬁx", " 東京都", "日本語",
                   " 한국어", " ภาษาไทย", " हिन्दी", " 😀", "👍🏽", "🇫🇷", " e\u0301", " 12345", " 3.14", "2026", " —",
                   "…", " «", "»", "\n", "\n\n", "\t", "  ", " ", " \u00a0", "\u3000", " antidisestablishment",
                   " unbelievably", " Übermut", " (x)", "!", ",", " ñandú"]


def _unicode_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_UNICODE_PIECES) for _ in range(rng.randint(6, 24))) for _ in range(count)]


@pytest.mark.parametrize("source, family", [("smollm2", ("byte_level", None)), ("mistral-v1", ("sentencepiece", "always"))])
def test_inside_labels_match_a_dense_reference_on_real_tokenizers(real_tokenizers, toks, source, family):
    """Labels inside source tokens, for a real byte-level BPE (SmolLM2) and a real SentencePiece source
    (Mistral: byte fallback, dummy prefix) onto a small byte-level target (whose tokens are mostly
    shorter, so that many target positions lie inside source tokens), on random unicode-heavy texts:
    every label of _reference_labels (the dense distribution over the whole vocabulary restricted to
    the ids that extend the characters seen, renormalised, top-k, projected) and no other."""
    src, tgt = real_tokenizers[source], toks["bytes_plain"]
    vocab = len(src) + 5
    model = LowRankOracle(vocab, seed=7)
    vocab_map = VocabMap.build(src, tgt, vocab)
    k = 4
    # A byte-level vocabulary that lacks a byte of the text drops it (tests/test_alignment.py covers that).
    texts = [text for text in _unicode_texts(8, seed=11)
             if family[0] != "byte_level" or not facts(src)[2] & set(text.encode())]
    assert len(texts) >= 6
    answer = SourceScorer(model, src, tgt, vocab_map, top_k=k, dtype=torch.float32).score(texts)
    inside_positions = beyond_topk = 0
    for row, text in enumerate(texts):
        expected, inside = _reference_labels(model, src, tgt, family, ("byte_level", None), text, vocab_map, k)
        expected = {t: v for t, v in expected.items() if (v[0] >= 0).any() and torch.isfinite(v[1]).any()}
        got = set(torch.nonzero(answer.valid[row]).flatten().tolist())
        assert got == set(expected), (row, text, sorted(got ^ set(expected)))
        for t, (ids, values) in expected.items():
            keep = (ids >= 0) & torch.isfinite(values).numpy()
            assert answer.indices[row, t][torch.from_numpy(keep)].tolist() == ids[keep].tolist(), (row, t)
            torch.testing.assert_close(answer.logprobs[row, t][torch.from_numpy(keep)].double(),
                                       values[torch.from_numpy(keep)], atol=1e-4, rtol=0)
        dense = dense_reference(model, src, text)[0]
        plan = SourceScorer(model, src, tgt, vocab_map, top_k=k).plans([text])[0]
        for t in inside & set(expected):
            inside_positions += 1
            seen = text[plan.seen_from[t]:plan.next_start[t]].encode()
            top = torch.topk(dense[plan.source[t]], k).indices.tolist()
            spelled = _spelled(src, family[0], vocab)
            beyond_topk += not any(spelled[i] and spelled[i].startswith(seen) and len(spelled[i]) > len(seen) for i in top)
    # Many inside positions, and some that the source's unconditional top-k could not have labelled.
    assert inside_positions > 20 and beyond_topk > 5, (inside_positions, beyond_topk)


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


def test_scoring_through_hidden_states_equals_scoring_through_full_logits(real_tokenizers, toks):
    """A real source scored as build_scorer does (HeadChunkedForward: logits made a few positions at a time,
    including the inside-token candidates) gives the answers of the same model's full logits."""
    from fusion.sources.loading import HeadChunkedForward, head_chunked

    src, tgt = real_tokenizers["smollm2"], toks["bytes_plain"]
    model = tiny_llama(len(src), seed=3)
    chunked = head_chunked(model)
    assert isinstance(chunked, HeadChunkedForward)
    vocab_map = VocabMap.build(src, tgt, len(src))
    texts = [text for text in _unicode_texts(6, seed=5) if not facts(src)[2] & set(text.encode())]
    full = SourceScorer(model, src, tgt, vocab_map, top_k=4, chunk_rows=7).score(texts)
    heads = SourceScorer(chunked, src, tgt, vocab_map, top_k=4, chunk_rows=7).score(texts)
    plans = SourceScorer(model, src, tgt, vocab_map, top_k=4).plans(texts)
    assert sum(int((plan.kind == INSIDE).sum()) for plan in plans) > 10  # the inside-token path is exercised
    assert torch.equal(full.valid, heads.valid) and torch.equal(full.indices, heads.indices)
    for name in ("logprobs", "nll_per_token", "nll_per_byte"):
        torch.testing.assert_close(getattr(heads, name), getattr(full, name), atol=1e-5, rtol=1e-5, msg=name)
