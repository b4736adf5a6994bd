"""Colocated sources: every source model inside the trainer process, asked only for its chosen rows.

``answer`` is the whole interface the training step uses, so a disaggregated transport (engine
groups answering over the exchange group) can stand in for this class unchanged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion.config import SourceConfig
from fusion.sources.answer import SparseSoftLabels
from fusion.sources.scoring import Offsets, SourceScorer
from fusion.vocab_map import VocabMap

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class SourceCounters:
    """What one source did so far on this rank (requests = forward passes)."""

    requests: int = 0
    sequences: int = 0
    seconds: float = 0.0
    failures: int = 0
    coverage: dict = field(default_factory=dict)


class ColocatedSources:
    """Source models loaded in this process, aligned to the target tokenizer.

    Args:
        specs: the run's sources, in config order (their index is the source dimension).
        target_tokenizer: the target's fast tokenizer.
        top_k, temperature: candidates per position and the temperature they are stored at.
        max_length: target/source tokens per sequence (chunks fit it under every tokenizer).
        cache_dir: where vocabulary maps are cached.
        device: where source models run.
    """

    def __init__(self, specs: Sequence[SourceConfig], target_tokenizer, top_k: int, temperature: float,
                 max_length: int, cache_dir: Path, device: torch.device):
        self.names = [spec.name for spec in specs]
        self.batch_sizes = [spec.batch_size for spec in specs]
        self.top_k = top_k
        self.scorers: list[SourceScorer] = []
        self.counters = [SourceCounters() for _ in specs]
        for spec, counters in zip(specs, self.counters):
            tokenizer = AutoTokenizer.from_pretrained(spec.path)
            model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=DTYPES[spec.dtype]).to(device).eval()
            # The logits' width, not len(tokenizer): padded vocabularies have extra rows.
            vocab_size = model.get_output_embeddings().weight.shape[0]
            vocab_map = VocabMap.build(tokenizer, target_tokenizer, vocab_size, cache_dir=cache_dir)
            counters.coverage = vocab_map.coverage()
            self.scorers.append(SourceScorer(model, tokenizer, target_tokenizer, vocab_map, top_k=top_k,
                                             temperature=temperature, dtype=torch.float32, max_length=max_length,
                                             device=device))

    def __len__(self) -> int:
        return len(self.scorers)

    @property
    def available(self) -> torch.Tensor:
        """``[S]`` bool: sources that can be asked (colocated sources never go down)."""
        return torch.ones(len(self), dtype=torch.bool)

    def answer(self, texts: Sequence[str], target_offsets: Sequence[Offsets], chosen: torch.Tensor,
               length: int) -> list[SparseSoftLabels]:
        """One answer per source for the whole batch; rows a source was not chosen for stay invalid.

        Args:
            texts: B raw texts; target_offsets: their target-tokenizer offsets.
            chosen: ``[B, S]`` bool, which sources run for which sequence.
            length: position dimension L of the answers (the target batch width).
        """
        answers = []
        for source, scorer in enumerate(self.scorers):
            full = SparseSoftLabels.empty(len(texts), length, self.top_k, torch.float32)
            rows = chosen[:, source].nonzero().flatten().tolist()
            batch_size = self.batch_sizes[source]
            for start in range(0, len(rows), batch_size):
                part_rows = rows[start:start + batch_size]
                started = time.perf_counter()
                part = scorer.score([texts[row] for row in part_rows], [target_offsets[row] for row in part_rows], length)
                counters = self.counters[source]
                counters.seconds += time.perf_counter() - started
                counters.requests += 1
                counters.sequences += len(part_rows)
                index = torch.tensor(part_rows)
                for name in ("indices", "logprobs", "valid", "nll_per_token", "nll_per_byte"):
                    getattr(full, name)[index] = getattr(part, name)
            answers.append(full)
        return answers
