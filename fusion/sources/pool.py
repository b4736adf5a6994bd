"""Where the training step gets source answers from, asked only for the rows chosen for each source.

``ColocatedSources`` runs every source model inside the trainer process; ``OfflineSources``
reads answers that ``launch/precompute.py`` wrote. ``answer`` is the whole interface the step
uses, so a disaggregated transport (engine groups over the exchange group) can stand in too.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion.config import ConfigError, SourceConfig
from fusion.precompute import corpus_sha256, load_answers, read_manifest
from fusion.sources.answer import SparseSoftLabels, from_arrow
from fusion.sources.scoring import Offsets, SourceScorer
from fusion.vocab_map import VocabMap, tokenizer_sha256

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class SourceCounters:
    """What one source did so far for this rank.

    ``requests`` are forward passes, ``tokens`` the target tokens of the sequences sent,
    ``seconds`` the source's compute time and ``waited`` the time the trainer was blocked on it
    (the same thing in-process; less when a disaggregated source computes ahead).
    """

    requests: int = 0
    sequences: int = 0
    tokens: int = 0
    seconds: float = 0.0
    waited: float = 0.0
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

    def answer(self, batch: dict, target_offsets: Sequence[Offsets], chosen: torch.Tensor, length: int) -> list[SparseSoftLabels]:
        """One answer per source for the whole batch; rows a source was not chosen for stay invalid.

        Args:
            batch: the collated batch (its ``texts``).
            target_offsets: the texts' target-tokenizer offsets.
            chosen: ``[B, S]`` bool, which sources run for which sequence.
            length: position dimension L of the answers (the target batch width).
        """
        texts = batch["texts"]

        def score(source: int, rows: list[int]) -> SparseSoftLabels:
            return self.scorers[source].score([texts[row] for row in rows], [target_offsets[row] for row in rows], length)

        return _answers_by_source(score, chosen, batch["attention_mask"], self.top_k, self.batch_sizes, self.counters)


class OfflineSources:
    """Sparse answers precomputed by ``launch/precompute.py``, read by chunk index.

    Only the rows chosen for a source are read, so a mode uses no answer it did not ask for.
    The manifest must match this run: the same target tokenizer, top-k, temperature and the
    same chunked training split (by content hash). A precompute may cover a subset of the split
    (``data.max_train_chunks``); rows are found through their stored ``chunk_index``.

    Raises:
        ConfigError: answers are missing for a source, were made with other settings, or (in
            ``answer``) do not cover a chunk the run asks for.
    """

    def __init__(self, specs: Sequence[SourceConfig], answers_dir: Path, target_tokenizer, top_k: int,
                 temperature: float, train_chunks):
        self.names = [spec.name for spec in specs]
        self.batch_sizes = [spec.batch_size for spec in specs]
        self.top_k = top_k
        self.counters = [SourceCounters() for _ in specs]
        self.tables = []
        self.rows_by_chunk: list[dict[int, int]] = []
        expected = {"target_tokenizer_sha256": tokenizer_sha256(target_tokenizer), "top_k": top_k,
                    "temperature": temperature, "corpus_sha256": corpus_sha256(train_chunks.select_columns(["text"]))}
        for spec in specs:
            source_dir = Path(answers_dir) / spec.name
            try:
                manifest = read_manifest(source_dir)
                answers = load_answers(source_dir)
            except (FileNotFoundError, ValueError) as error:
                raise ConfigError(f"fusion.answers_dir: no complete answers of source {spec.name!r} in {source_dir} ({error}); "
                                  "run `python launch/precompute.py --config <this config>` first") from None
            for key, value in expected.items():
                if manifest.get(key) != value:
                    raise ConfigError(f"fusion.answers_dir: answers of {spec.name!r} were made with another {key} "
                                      f"({manifest.get(key)!r}, this run: {value!r}); rerun launch/precompute.py")
            self.tables.append(answers.with_format("arrow"))
            self.rows_by_chunk.append({chunk: row for row, chunk in enumerate(answers["chunk_index"])})

    def __len__(self) -> int:
        return len(self.tables)

    @property
    def available(self) -> torch.Tensor:
        return torch.ones(len(self), dtype=torch.bool)

    def answer(self, batch: dict, target_offsets: Sequence[Offsets], chosen: torch.Tensor, length: int) -> list[SparseSoftLabels]:
        """Like ``ColocatedSources.answer``; rows are looked up by ``batch["chunk_index"]``."""
        chunk_index = batch["chunk_index"]

        def read(source: int, rows: list[int]) -> SparseSoftLabels:
            try:
                stored = [self.rows_by_chunk[source][int(chunk_index[row])] for row in rows]
            except KeyError as error:
                raise ConfigError(f"fusion.answers_dir: the answers of {self.names[source]!r} lack chunk {error.args[0]} of the "
                                  "training split; precompute with this run's data.max_train_chunks and data.subset_seed "
                                  "(or run.seed)") from None
            return from_arrow(self.tables[source][stored], length, torch.float32)

        return _answers_by_source(read, chosen, batch["attention_mask"], self.top_k, self.batch_sizes, self.counters)


def _answers_by_source(fetch, chosen: torch.Tensor, attention_mask: torch.Tensor, top_k: int, batch_sizes: list[int],
                       counters: list[SourceCounters]) -> list[SparseSoftLabels]:
    """Call ``fetch(source, rows)`` in batches over the rows chosen for each source; assemble full answers."""
    length = attention_mask.shape[1]
    row_tokens = attention_mask.sum(1)
    answers = []
    for source, batch_size in enumerate(batch_sizes):
        full = SparseSoftLabels.empty(chosen.shape[0], length, top_k, torch.float32)
        rows = chosen[:, source].nonzero().flatten().tolist()
        for start in range(0, len(rows), batch_size):
            part_rows = rows[start:start + batch_size]
            started = time.perf_counter()
            part = fetch(source, part_rows)
            elapsed = time.perf_counter() - started
            counters[source].seconds += elapsed
            counters[source].waited += elapsed
            counters[source].requests += 1
            counters[source].sequences += len(part_rows)
            counters[source].tokens += int(row_tokens[part_rows].sum())
            index = torch.tensor(part_rows)
            for name in ("indices", "logprobs", "valid", "nll_per_token", "nll_per_byte"):
                getattr(full, name)[index] = getattr(part, name)
        answers.append(full)
    return answers
