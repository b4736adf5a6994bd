"""Offline soft labels: every source's sparse answers over a chunked corpus split, in Arrow shards.

Layout written under ``out_dir`` (one folder per source)::

    out_dir/<source>/manifest.json                      settings, hashes, shard ranges, row counts
    out_dir/<source>/shard-00000-of-00004.arrow         the first shard_size chunks computed
    out_dir/<source>/shard-00001-of-00004.arrow         ...
    out_dir/vocab_maps/vocab_map-<hash>.npz             cached vocabulary maps (fusion.vocab_map)

Each shard is one Arrow IPC stream (the format ``datasets`` itself caches in), with the schema
of :func:`fusion.sources.answer.answer_features`; :func:`load_answers` memory-maps them as one
``datasets.Dataset``; its ``chunk_index`` column gives each answer's row in the whole chunked split.
By default every chunk is computed (row i is chunk i); ``rows`` restricts the work to a subset, e.g.
the trainer's ``data.max_train_chunks`` sample (:func:`subset_rows`), and the manifest records it.

Resuming and parallel ranks: a shard is written to a temporary file and renamed into place, so
a shard file that exists is complete and is never recomputed; an interrupted shard leaves only
its temporary file, which the next run deletes before recomputing the shard. Rank r of W computes shards r, r+W, ...;
shards are processed in fixed batches within their own rows, so any split over ranks, and any
resume, writes byte-identical files (given the same hardware and thread settings).
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion.sources.answer import answer_features, to_arrow
from fusion.sources.scoring import SourceScorer, encode_with_offsets
from fusion.vocab_map import VocabMap, tokenizer_sha256

MANIFEST = "manifest.json"
# Cached source→target vocabulary maps, shared by ranks and reruns (building one can take minutes).
VOCAB_MAPS = "vocab_maps"
FORMAT = "fusion.sparse_answers/1"
# Manifest entries that must agree for a resumed run to extend an existing output folder.
_SETTINGS = ("format", "source", "source_tokenizer_sha256", "target_tokenizer_sha256", "corpus_sha256",
             "num_rows", "rows_sha256", "shard_size", "top_k", "temperature", "max_length", "logprob_dtype")


@dataclass
class SourceReport:
    """What one call did for one source (this rank only)."""

    shards_written: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)
    sequences: int = 0
    target_tokens: int = 0
    seconds: float = 0.0


def corpus_sha256(corpus: datasets.Dataset) -> str:
    """Hash of the ``text`` column in order (length-prefixed, so chunk boundaries count)."""
    digest = hashlib.sha256()
    for batch in corpus.select_columns(["text"]).iter(batch_size=1024):
        for text in batch["text"]:
            data = text.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


def subset_rows(num_rows: int, limit: int | None, seed: int) -> list[int] | None:
    """Rows of a chunked split kept by ``data.max_train_chunks = limit``, in the trainer's order.

    The trainer keeps ``chunks.shuffle(seed=seed).select(range(limit))``; ``datasets`` shuffles with
    ``np.random.default_rng(seed).permutation``, reproduced here so precompute computes exactly
    those chunks. Returns None (every row) when ``limit`` is None or not below ``num_rows``.
    """
    if limit is None or num_rows <= limit:
        return None
    return np.random.default_rng(seed).permutation(num_rows)[:limit].tolist()


def rows_sha256(rows: Sequence[int] | None) -> str | None:
    """Hash of a row subset (None: the whole split), so a resumed run cannot mix two subsets."""
    if rows is None:
        return None
    return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()


def shard_ranges(num_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges of consecutive shards of ``shard_size`` rows (the last may be shorter).

    Raises:
        ValueError: ``shard_size`` is not positive.
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size={shard_size} must be positive")
    return [(start, min(start + shard_size, num_rows)) for start in range(0, num_rows, shard_size)]


def shard_file(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.arrow"


def rank_shards(num_shards: int, rank: int, world_size: int) -> range:
    """Shards of ``rank``: r, r+W, r+2W, ...

    Raises:
        ValueError: ``rank`` is not in ``[0, world_size)``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    return range(rank, num_shards, world_size)


def _write_atomic(path: Path, data: bytes | pa.Table) -> None:
    # A unique temporary name per writer: ranks may write the same manifest at the same time.
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.tmp-", delete=False) as handle:
        tmp = Path(handle.name)
        if isinstance(data, pa.Table):
            with pa.ipc.new_stream(handle, data.schema) as writer:
                writer.write_table(data)
        else:
            handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    # NamedTemporaryFile creates files readable by the owner only; outputs are meant to be shared.
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_manifest(source_dir: str | Path) -> dict:
    """The manifest of one source's output folder.

    Raises:
        ValueError: the folder holds no manifest.
    """
    path = Path(source_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path} does not exist; run launch/precompute.py for this source first")
    return json.loads(path.read_text())


def _ensure_manifest(source_dir: Path, manifest: dict) -> None:
    """Write ``manifest``, or check that the one already there was made with the same settings."""
    path = source_dir / MANIFEST
    if path.is_file():
        existing = json.loads(path.read_text())
        changed = [key for key in _SETTINGS if existing.get(key) != manifest[key]]
        if changed:
            details = ", ".join(f"{key}: {existing.get(key)!r} there vs {manifest[key]!r} now" for key in changed)
            raise ValueError(
                f"{source_dir} holds answers computed with other settings ({details}); "
                "write to a fresh output folder or delete this one"
            )
        return
    source_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def load_answers(source_dir: str | Path) -> datasets.Dataset:
    """All shards of one source as one memory-mapped ``datasets.Dataset`` (``chunk_index``: row in the split).

    Raises:
        ValueError: no manifest, or some shards are missing (an unfinished run: rerun it).
    """
    source_dir = Path(source_dir)
    manifest = read_manifest(source_dir)
    missing = [s["file"] for s in manifest["shards"] if not (source_dir / s["file"]).is_file()]
    if missing:
        raise ValueError(
            f"{source_dir}: {len(missing)} of {len(manifest['shards'])} shards are missing ({missing[:3]}...); "
            "rerun launch/precompute.py with the same arguments to finish them"
        )
    if not manifest["shards"]:
        return datasets.Dataset.from_dict({}, features=answer_features(manifest["top_k"]))
    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(source_dir / s["file"])) for s in manifest["shards"]])


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


def load_source(model_dir: str | Path, device: torch.device | str, dtype: torch.dtype):
    """A source's tokenizer and eval-mode CausalLM from a Hugging Face folder."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model, tokenizer


def precompute(
    sources: Sequence[tuple[str, str | Path]],
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
    model_dtype: torch.dtype = torch.float32,
    chunk_rows: int = 512,
    progress: bool = True,
    rows: Sequence[int] | None = None,
) -> dict[str, SourceReport]:
    """Write this rank's shards of sparse answers of every source over ``corpus``.

    Args:
        sources: ``(name, model_dir)`` pairs; ``model_dir`` holds a HF CausalLM and its tokenizer.
        target_tokenizer: fast tokenizer whose positions and ids the answers use.
        corpus: the chunked split, a ``datasets.Dataset`` with a ``text`` column.
        out_dir: output root; answers of source ``name`` go to ``out_dir/name/``.
        max_length: tokens per chunk for both tokenizers (as the chunker guaranteed), or None.
        shard_size: corpus rows per shard.
        top_k, temperature: see :class:`fusion.sources.scoring.SourceScorer`.
        batch_size: sequences per forward pass.
        rank, world_size: this process computes shards rank, rank+world_size, ...
        device, model_dtype: where and in which dtype source models run.
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
    names = [name for name, _ in sources]
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
    for name, model_dir in sources:
        source_dir = Path(out_dir) / name
        source_tokenizer = AutoTokenizer.from_pretrained(model_dir)
        manifest = dict(base, source=name, model_dir=str(model_dir), source_tokenizer_sha256=tokenizer_sha256(source_tokenizer))
        _ensure_manifest(source_dir, manifest)
        reports[name] = _run_source(
            source_dir, model_dir, target_tokenizer, corpus, chunk_index, ranges, mine, vocab_map_dir=Path(out_dir) / VOCAB_MAPS,
            max_length=max_length, top_k=top_k, temperature=temperature, batch_size=batch_size,
            device=device, model_dtype=model_dtype, chunk_rows=chunk_rows, progress=progress,
            desc=f"precompute {name} [rank {rank}/{world_size}]",
        )
    return reports


def _run_source(
    source_dir: Path, model_dir, target_tokenizer, corpus: datasets.Dataset, chunk_index: list[int],
    ranges: list[tuple[int, int]], mine: range,
    *, vocab_map_dir: Path, max_length, top_k, temperature, batch_size, device, model_dtype, chunk_rows, progress, desc,
) -> SourceReport:
    report = SourceReport()
    pending = []
    for index in mine:
        name = shard_file(index, len(ranges))
        (report.shards_skipped if (source_dir / name).is_file() else pending).append(name)
    if not pending:
        return report
    started = time.perf_counter()
    model, source_tokenizer = load_source(model_dir, device, model_dtype)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    vocab_map = VocabMap.build(source_tokenizer, target_tokenizer, vocab_size, cache_dir=vocab_map_dir)
    scorer = SourceScorer(
        model, source_tokenizer, target_tokenizer, vocab_map, top_k=top_k, temperature=temperature,
        max_length=max_length, chunk_rows=chunk_rows, device=device,
    )
    by_name = {shard_file(i, len(ranges)): ranges[i] for i in mine}
    with tqdm(total=sum(by_name[n][1] - by_name[n][0] for n in pending), desc=desc, unit="seq", disable=not progress) as bar:
        for name in pending:
            start, stop = by_name[name]
            # Leftovers of an interrupted run on this shard (only this rank ever writes it).
            for stale in source_dir.glob(f".{name}.tmp-*"):
                stale.unlink()
            shard_rows = chunk_index[start:stop]
            table, tokens = score_rows(scorer, corpus.select(shard_rows)["text"], shard_rows, batch_size, max_length)
            _write_atomic(source_dir / name, table)
            report.shards_written.append(name)
            report.sequences += stop - start
            report.target_tokens += tokens
            bar.update(stop - start)
            bar.set_postfix(tok_per_s=f"{report.target_tokens / (time.perf_counter() - started):.0f}")
    del scorer, model
    gc.collect()
    report.seconds = time.perf_counter() - started
    return report
