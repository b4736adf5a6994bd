"""Opening one source: its model and the scorer that turns its logits into sparse target answers.

Every place that scores with a source (colocated pools, engine groups, the offline precompute)
builds its scorer here, so the vocabulary map, top-k, temperature and truncation are the same
wherever a source runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion.sources.scoring import SourceScorer
from fusion.vocab_map import VocabMap

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_causal_lm(model_dir: str | Path, dtype: str | torch.dtype) -> torch.nn.Module:
    """An eval-mode CausalLM from a Hugging Face folder (``dtype``: a ``DTYPES`` name or a torch dtype)."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def vocab_size_of(model: torch.nn.Module) -> int:
    """The logits' width, not ``len(tokenizer)``: padded vocabularies have extra rows."""
    return model.get_output_embeddings().weight.shape[0]


def build_scorer(forward: Callable, vocab_size: int, source_dir: str | Path, target_tokenizer, *, top_k: int,
                 temperature: float, max_length: int | None, vocab_map_dir: str | Path, device: torch.device | str,
                 chunk_rows: int = 512) -> SourceScorer:
    """The scorer of one source whose logits (``vocab_size`` wide) come from ``forward``.

    Args:
        forward: the source model, or any callable with its signature (a DeepSpeed engine).
        source_dir: the source's Hugging Face folder (its tokenizer is read from there).
        target_tokenizer: the target's fast tokenizer (positions and ids of the answers).
        top_k, temperature: candidates per position and the temperature they are kept at.
        max_length: tokens per sequence (chunks fit it under every tokenizer); None: no truncation.
        vocab_map_dir: where vocabulary maps are cached (shared by ranks and reruns).
        device: where the source's inputs go.
    """
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    vocab_map = VocabMap.build(tokenizer, target_tokenizer, vocab_size, cache_dir=vocab_map_dir)
    return SourceScorer(forward, tokenizer, target_tokenizer, vocab_map, top_k=top_k, temperature=temperature,
                        dtype=torch.float32, max_length=max_length, chunk_rows=chunk_rows, device=device)
