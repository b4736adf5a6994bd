"""Sources that answer inside the trainer process, asked only for the rows chosen for each source.

``ColocatedSources`` runs every source model inside the trainer process; ``OfflineSources``
reads answers that ``launch/precompute.py`` wrote (:mod:`fusion.sources.store`). Both implement
the ``fusion.sources.base.Sources`` interface through ``InProcessSources``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from fusion.config import ConfigError, SourceConfig
from fusion.sources.answer import SparseSoftLabels, from_arrow
from fusion.sources.base import InProcessSources, SourceCounters
from fusion.sources.loading import build_scorer, load_causal_lm, vocab_size_of
from fusion.sources.scoring import encode_with_offsets
from fusion.sources.store import corpus_sha256, load_answers, read_manifest
from fusion.vocab_map import tokenizer_sha256


class ColocatedSources(InProcessSources):
    """Source models loaded in this process, aligned to the target tokenizer.

    Args:
        specs: the run's sources, in config order (their index is the source dimension).
        target_tokenizer: the target's fast tokenizer.
        top_k, temperature: candidates per position and the temperature they are stored at.
        max_length: target/source tokens per sequence (chunks fit it under every tokenizer).
        cache_dir: where vocabulary maps are cached.
        device: where source models run.
    """

    overlaps = False

    def __init__(self, specs: Sequence[SourceConfig], target_tokenizer, top_k: int, temperature: float,
                 max_length: int, cache_dir: Path, device: torch.device):
        self.names = [spec.name for spec in specs]
        self.batch_sizes = [spec.batch_size for spec in specs]
        self.top_k = top_k
        self.target_tokenizer = target_tokenizer
        self.max_length = max_length
        self.counters = [SourceCounters() for _ in specs]
        self.scorers = []
        for spec, counters in zip(specs, self.counters):
            model = load_causal_lm(spec.path, spec.dtype, spec.attention).to(device)
            scorer = build_scorer(model, vocab_size_of(model), spec.path, target_tokenizer, top_k=top_k,
                                  temperature=temperature, max_length=max_length, vocab_map_dir=cache_dir, device=device)
            counters.coverage = scorer.vocab_map.coverage()
            self.scorers.append(scorer)

    def _fetch(self, source: int, segments, documents: list[int]) -> SparseSoftLabels:
        texts = [segments.texts[index] for index in documents]
        _, target_offsets, _ = encode_with_offsets(self.target_tokenizer, texts, self.max_length)
        return self.scorers[source].score(texts, target_offsets)


class OfflineSources(InProcessSources):
    """Sparse answers precomputed by ``launch/precompute.py``, read by chunk index.

    Only the rows chosen for a source are read, so a mode uses no answer it did not ask for.
    The manifest must match this run: the same target tokenizer, top-k, temperature and the
    same chunked training split (by content hash). A precompute may cover a subset of the split
    (``data.max_train_chunks``); rows are found through their stored ``chunk_index``. Answers are
    stored per document, so packed rows read the answers of their documents, placed like live ones:
    per chunk, or per piece when packing cuts chunks (the precompute then runs over the pieces).

    Raises:
        ConfigError: answers are missing for a source, were made with other settings, or (when
            collected) do not cover a chunk the run asks for.
    """

    overlaps = False

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

    def _fetch(self, source: int, segments, documents: list[int]) -> SparseSoftLabels:
        chunk_index = segments.chunk_index
        try:
            stored = [self.rows_by_chunk[source][int(chunk_index[index])] for index in documents]
        except KeyError as error:
            raise ConfigError(f"fusion.answers_dir: the answers of {self.names[source]!r} lack chunk {error.args[0]} of the "
                              "training split; precompute with this run's data.max_train_chunks and data.subset_seed "
                              "(or run.seed)") from None
        return from_arrow(self.tables[source][stored], None, torch.float32)
