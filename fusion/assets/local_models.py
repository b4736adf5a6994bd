"""Small causal LMs the project trains itself from scratch: small sources and the demo's target.

Each small source uses a real tokenizer of another family (GPT-2 BPE, Llama SentencePiece,
WordPiece) and is trained briefly on one domain. They are far weaker than the pretrained
sources, on their own domain too (``assets/models/report.md``): the pools use one of them as the
deliberately weak source a selector must learn to avoid, and they give the tests and the
alignment benchmarks more tokenizer families. The strong specialists are the pretrained models
continued on one domain (``fusion.assets.specialists``). The target gets a byte-level BPE vocabulary trained on
the whole corpus and a short pre-training on every domain; the demo then continues it.
Everything is deterministic given the seed (single process, fixed data order).
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fusion.data import chunk_documents


@dataclass(frozen=True)
class LocalModelSpec:
    """A model trained here. ``tokenizer`` names a folder of assets/tokenizers, or None for a new BPE."""

    name: str
    tokenizer: str | None
    domains: tuple[str, ...]
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 384
    steps: int = 80
    batch_size: int = 8
    max_length: int = 128
    lr: float = 3e-3
    new_vocab_size: int = 8192


SMALL_SOURCES = (
    LocalModelSpec("code-gpt2", "gpt2", ("code",)),
    LocalModelSpec("bible-mistral", "mistral-v1", ("bible",)),
    LocalModelSpec("shakespeare-wordpiece", "minilm-wordpiece", ("shakespeare",)),
)
TARGET = LocalModelSpec("target", None, ("wiki", "shakespeare", "bible", "code"),
                        hidden_size=256, layers=4, heads=4, intermediate_size=688, steps=160, lr=1.5e-3)


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 conventions) that prepends ``<s>`` as BOS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def load_tokenizer(spec: LocalModelSpec, tokenizers_dir: Path, train_texts: Sequence[str]):
    if spec.tokenizer is None:
        return train_bpe_tokenizer(train_texts, spec.new_vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(tokenizers_dir / spec.tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(spec: LocalModelSpec, tokenizer, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=max(512, spec.max_length), tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def _batches(tokenizer, texts: list[str], spec: LocalModelSpec, seed: int):
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(spec.steps):
        if len(order) < spec.batch_size:
            refill = list(range(len(texts)))
            rng.shuffle(refill)
            order.extend(refill)
        batch = [texts[index] for index in order[:spec.batch_size]]
        del order[:spec.batch_size]
        encoded = tokenizer(batch, padding=True, truncation=True, max_length=spec.max_length, return_tensors="pt")
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        yield encoded["input_ids"], encoded["attention_mask"], labels


def train_local_model(spec: LocalModelSpec, train_texts: list[str], tokenizers_dir: Path, out_dir: Path,
                      seed: int) -> dict:
    """Train one model from scratch and save it (with its tokenizer) as a Hugging Face folder.

    ``train_texts`` are documents of the spec's domains; they are chunked to ``spec.max_length``.
    Returns the training record written to ``out_dir/training.json``.
    """
    tokenizer = load_tokenizer(spec, tokenizers_dir, train_texts)
    chunks, _, _ = chunk_documents(train_texts, ["train"] * len(train_texts), [tokenizer], spec.max_length)
    model = build_model(spec, tokenizer, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0, betas=(0.9, 0.95))
    warmup = max(1, spec.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / spec.steps))))
    started = time.time()
    losses: list[float] = []
    model.train()
    progress = tqdm(_batches(tokenizer, chunks, spec, seed), total=spec.steps, desc=f"train {spec.name}", leave=False)
    for input_ids, attention_mask, labels in progress:
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{loss.item():.3f}")
    record = {"spec": asdict(spec), "seed": seed, "train_chunks": len(chunks), "seconds": round(time.time() - started, 1),
              "parameters": sum(p.numel() for p in model.parameters()),
              "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:])}
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "training.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.replace(out_dir)
    return record


def ensure_local_model(spec: LocalModelSpec, corpus_train, tokenizers_dir: Path, models_dir: Path, seed: int) -> Path:
    """Train ``spec`` into ``models_dir/<name>`` unless it is already there (cached)."""
    out_dir = models_dir / spec.name
    if (out_dir / "training.json").is_file():
        return out_dir
    texts = [row["text"] for row in corpus_train if row["domain"] in spec.domains]
    if not texts:
        raise ValueError(f"{spec.name}: the corpus has no training documents for domains {spec.domains}")
    train_local_model(spec, texts, tokenizers_dir, out_dir, seed)
    return out_dir
