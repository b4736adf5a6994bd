"""Offline soft labels: every source's sparse answers over a chunked corpus split, in Arrow shards.

The folder layout and format are those of :mod:`fusion.sources.store`. By default every chunk is
computed (row i is chunk i); ``rows`` restricts the work to a subset, e.g. the trainer's
``data.max_train_chunks`` sample (:func:`fusion.splits.subset_rows`), and the manifest records it.

Resuming and parallel ranks: a shard file that exists is complete and is never recomputed; an
interrupted shard leaves only its temporary file, which the next run deletes before recomputing the
shard. Rank r of W computes shards r, r+W, ...; shards are processed in fixed batches within their
own rows, so any split over ranks, and any resume, writes byte-identical files (given the same
hardware and thread settings).
"""
from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from fusion.config import SourceConfig
from fusion.sources.answer import to_arrow
from fusion.sources.loading import build_scorer, load_causal_lm, vocab_size_of
from fusion.sources.scoring import SourceScorer, encode_with_offsets
from fusion.sources.store import (FORMAT, VOCAB_MAPS, corpus_sha256, ensure_manifest, rank_shards, rows_sha256,
                                  shard_file, shard_ranges, write_atomic)
from fusion.vocab_map import tokenizer_sha256


@dataclass
class SourceReport:
    """What one call did for one source (this rank only)."""

    shards_written: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)
    sequences: int = 0
    target_tokens: int = 0
    seconds: float = 0.0


def score_rows(
    scorer: SourceScorer, texts: Sequence[str], chunk_index: Sequence[int], batch_size: int, max_length: int | None
) -> tuple[pa.Table, int]:
    """Answers for chunks ``texts`` (rows ``chunk_index`` of the split) as one Arrow table.

    Rows are batched in order of target length (less padding) and returned in corpus order.

    Returns:
        ``(table, number of target tokens)``.
    """
    _, target_offsets, _ = encode_with_offsets(scorer.target_tokenizer, texts, max_length)
    order = sorted(range(len(texts)), key=lambda i: (len(target_offsets[i]), i))
    tables = []
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        answer = scorer.score([texts[i] for i in batch], [target_offsets[i] for i in batch])
        lengths = [len(target_offsets[i]) for i in batch]
        tables.append(to_arrow(answer, [chunk_index[i] for i in batch], lengths))
    table = pa.concat_tables(tables).take(np.argsort(np.array(order)))
    return table.combine_chunks(), sum(len(o) for o in target_offsets)


def precompute(
    sources: Sequence[SourceConfig],
    target_tokenizer,
    corpus: datasets.Dataset,
    out_dir: str | Path,
    *,
    max_length: int | None,
    shard_size: int = 1024,
    top_k: int = 10,
    temperature: float = 1.0,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    chunk_rows: int = 512,
    progress: bool = True,
    rows: Sequence[int] | None = None,
) -> dict[str, SourceReport]:
    """Write this rank's shards of sparse answers of every source over ``corpus``.

    Args:
        sources: the run's sources; each ``path`` holds a HF CausalLM and its tokenizer, which runs in
            the source's ``dtype`` with its ``attention``.
        target_tokenizer: fast tokenizer whose positions and ids the answers use.
        corpus: the chunked split, a ``datasets.Dataset`` with a ``text`` column.
        out_dir: output root; answers of source ``name`` go to ``out_dir/name/``.
        max_length: tokens per chunk for both tokenizers (as the chunker guaranteed), or None.
        shard_size: corpus rows per shard.
        top_k, temperature: see :class:`fusion.sources.scoring.SourceScorer`.
        batch_size: sequences per forward pass.
        rank, world_size: this process computes shards rank, rank+world_size, ...
        device: where source models run.
        chunk_rows: rows of full-vocabulary log-softmax held at once.
        progress: show a tqdm bar per source.
        rows: the rows of ``corpus`` to compute, in this order (default: all); answers keep their
            row number in ``chunk_index``, so the whole split's hash still identifies the corpus.

    Returns:
        Per source name, what this call wrote and skipped, with its timing.

    Raises:
        ValueError: duplicate source names, a bad rank, the corpus has no ``text`` column, a row
            outside the corpus, or an existing output folder was made with other settings.
    """
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique, got {names}")
    if "text" not in corpus.column_names:
        raise ValueError(f"the corpus has columns {corpus.column_names}; precompute needs a 'text' column")
    if rows is not None and any(not 0 <= row < len(corpus) for row in rows):
        raise ValueError(f"rows must lie in [0, {len(corpus)}), the corpus's row range")
    chunk_index = list(range(len(corpus))) if rows is None else list(rows)
    ranges = shard_ranges(len(chunk_index), shard_size)
    mine = rank_shards(len(ranges), rank, world_size)
    base = {
        "format": FORMAT,
        "target_tokenizer_sha256": tokenizer_sha256(target_tokenizer),
        "corpus_sha256": corpus_sha256(corpus),
        "num_rows": len(chunk_index),
        "rows_sha256": rows_sha256(rows),
        "shard_size": shard_size,
        "top_k": top_k,
        "temperature": temperature,
        "max_length": max_length,
        "logprob_dtype": "float16",
        "shards": [
            {"file": shard_file(i, len(ranges)), "start": start, "stop": stop, "num_rows": stop - start}
            for i, (start, stop) in enumerate(ranges)
        ],
    }
    reports = {}
    for source in sources:
        source_dir = Path(out_dir) / source.name
        source_tokenizer = AutoTokenizer.from_pretrained(source.path)
        manifest = dict(base, source=source.name, model_dir=str(source.path), dtype=source.dtype,
                        source_tokenizer_sha256=tokenizer_sha256(source_tokenizer))
        ensure_manifest(source_dir, manifest)
        reports[source.name] = _run_source(
            source_dir, source, target_tokenizer, corpus, chunk_index, ranges, mine, vocab_map_dir=Path(out_dir) / VOCAB_MAPS,
            max_length=max_length, top_k=top_k, temperature=temperature, batch_size=batch_size,
            device=device, chunk_rows=chunk_rows, progress=progress, desc=f"precompute {source.name} [rank {rank}/{world_size}]",
        )
    return reports


def _run_source(
    source_dir: Path, source: SourceConfig, target_tokenizer, corpus: datasets.Dataset, chunk_index: list[int],
    ranges: list[tuple[int, int]], mine: range,
    *, vocab_map_dir: Path, max_length, top_k, temperature, batch_size, device, chunk_rows, progress, desc,
) -> SourceReport:
    report = SourceReport()
    pending = []
    for index in mine:
        name = shard_file(index, len(ranges))
        (report.shards_skipped if (source_dir / name).is_file() else pending).append(name)
    if not pending:
        return report
    started = time.perf_counter()
    model = load_causal_lm(source.path, source.dtype, source.attention).to(device)
    scorer = build_scorer(model, vocab_size_of(model), source.path, target_tokenizer, top_k=top_k, temperature=temperature,
                          max_length=max_length, vocab_map_dir=vocab_map_dir, device=device, chunk_rows=chunk_rows)
    by_name = {shard_file(i, len(ranges)): ranges[i] for i in mine}
    with tqdm(total=sum(by_name[n][1] - by_name[n][0] for n in pending), desc=desc, unit="seq", disable=not progress) as bar:
        for name in pending:
            start, stop = by_name[name]
            # Leftovers of an interrupted run on this shard (only this rank ever writes it).
            for stale in source_dir.glob(f".{name}.tmp-*"):
                stale.unlink()
            shard_rows = chunk_index[start:stop]
            table, tokens = score_rows(scorer, corpus.select(shard_rows)["text"], shard_rows, batch_size, max_length)
            write_atomic(source_dir / name, table)
            report.shards_written.append(name)
            report.sequences += stop - start
            report.target_tokens += tokens
            bar.update(stop - start)
            bar.set_postfix(tok_per_s=f"{report.target_tokens / (time.perf_counter() - started):.0f}")
    del scorer, model
    gc.collect()
    report.seconds = time.perf_counter() - started
    return report
