"""Offline answers on disk: the format, the manifest and reading them back.

Layout under an answers folder (one folder per source)::

    answers/<source>/manifest.json                      settings, hashes, shard ranges, row counts
    answers/<source>/shard-00000-of-00004.arrow         the first shard_size chunks computed
    answers/<source>/shard-00001-of-00004.arrow         ...
    answers/vocab_maps/vocab_map-<hash>.npz             cached vocabulary maps (fusion.vocab_map)

Each shard is one Arrow IPC stream (the format ``datasets`` itself caches in), with the schema
of :func:`fusion.sources.answer.answer_features`; :func:`load_answers` memory-maps them as one
``datasets.Dataset``; its ``chunk_index`` column gives each answer's row in the whole chunked split.
A shard is written to a temporary file and renamed into place (:func:`write_atomic`), so a shard
file that exists is complete. ``fusion.precompute`` writes these folders; ``OfflineSources`` reads them.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from fusion.sources.answer import answer_features

MANIFEST = "manifest.json"
# Cached source→target vocabulary maps, shared by ranks and reruns (building one can take minutes).
VOCAB_MAPS = "vocab_maps"
FORMAT = "fusion.sparse_answers/1"
# Manifest entries that must agree for a resumed run to extend an existing output folder.
SETTINGS = ("format", "source", "source_tokenizer_sha256", "target_tokenizer_sha256", "corpus_sha256",
            "num_rows", "rows_sha256", "shard_size", "top_k", "temperature", "max_length", "logprob_dtype", "dtype")


def corpus_sha256(corpus: datasets.Dataset) -> str:
    """Hash of the ``text`` column in order (length-prefixed, so chunk boundaries count)."""
    digest = hashlib.sha256()
    for batch in corpus.select_columns(["text"]).iter(batch_size=1024):
        for text in batch["text"]:
            data = text.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


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


def write_atomic(path: Path, data: bytes | pa.Table) -> None:
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


def ensure_manifest(source_dir: Path, manifest: dict) -> None:
    """Write ``manifest``, or check that the one already there was made with the same settings."""
    path = source_dir / MANIFEST
    if path.is_file():
        existing = json.loads(path.read_text())
        changed = [key for key in SETTINGS if existing.get(key) != manifest[key]]
        if changed:
            details = ", ".join(f"{key}: {existing.get(key)!r} there vs {manifest[key]!r} now" for key in changed)
            raise ValueError(
                f"{source_dir} holds answers computed with other settings ({details}); "
                "write to a fresh output folder or delete this one"
            )
        return
    source_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))


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
