"""The chunks a run reads: its corpus splits, chunked for every tokenizer of its config, the
subsets that ``data.max_train_chunks`` / ``data.max_eval_chunks`` keep, and the training rows
(packed when ``data.packing``, of pieces cut off the chunks when ``data.min_piece_tokens``).

The trainer, the offline precompute, ``launch/evaluate.py`` and the comparison all take their
chunks from here, so row i of a split and the rows of a subset mean the same chunks to all of them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from transformers import AutoTokenizer

from fusion.config import Config, ConfigError
from fusion.data import DataReport, corpus_layout, load_chunked_split
from fusion.packing import PackReport, pack_chunks


def subset_rows(num_rows: int, limit: int | None, seed: int) -> list[int] | None:
    """The rows a ``limit`` keeps: the first ``limit`` of a permutation drawn with ``seed``.

    Returns None (every row, in order) when ``limit`` is None or not below ``num_rows``.
    """
    if limit is None or num_rows <= limit:
        return None
    return np.random.default_rng(seed).permutation(num_rows)[:limit].tolist()


def subset_seed(config: Config) -> int:
    """Seed of the data subsets: ``data.subset_seed``, or ``run.seed`` when that is null."""
    return config.run.seed if config.data.subset_seed is None else config.data.subset_seed


def run_tokenizers(config: Config, extra_model_dirs: Sequence[str | Path] = ()) -> list:
    """The target's tokenizer, every source's, then those of ``extra_model_dirs`` (all read the same text)."""
    folders = [config.target, *(source.path for source in config.sources), *extra_model_dirs]
    return [AutoTokenizer.from_pretrained(folder) for folder in folders]


def chunked_split(config: Config, split_name: str, tokenizers: Sequence) -> tuple[datasets.Dataset, DataReport]:
    """The whole split ``split_name``, chunked so every chunk fits ``data.max_length`` tokens of every
    tokenizer (cached under ``run.cache_dir/chunks``).

    Raises:
        ConfigError: the corpus has no such split, or lacks one of ``data.domains`` (the message names
            ``data.train_split`` or ``data.eval_split`` when it is one of them, else ``--split``).
    """
    data = config.data
    try:
        return load_chunked_split(data.corpus, split_name, data.domains, tokenizers, data.max_length,
                                  cache_dir=str(Path(config.run.cache_dir) / "chunks"), **corpus_layout(data))
    except KeyError as error:
        key = {data.train_split: "data.train_split", data.eval_split: "data.eval_split"}.get(split_name, "--split")
        raise ConfigError(f"{key} / data.domains: {error.args[0]}") from None


def sample(chunks: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    """``chunks`` restricted to :func:`subset_rows` (all of them when ``limit`` keeps every row)."""
    rows = subset_rows(len(chunks), limit, seed)
    return chunks if rows is None else chunks.select(rows)


def held_out_chunks(config: Config, split_name: str, tokenizers: Sequence) -> datasets.Dataset:
    """The chunks of ``split_name`` a run evaluates on (for the eval split, the ``data.max_eval_chunks`` sample)."""
    chunks, _ = chunked_split(config, split_name, tokenizers)
    return eval_sample(config, chunks) if split_name == config.data.eval_split else chunks


def eval_sample(config: Config, eval_chunks: datasets.Dataset) -> datasets.Dataset:
    """The ``data.max_eval_chunks`` sample of the chunked eval split: what the trainer and evaluation score."""
    return sample(eval_chunks, config.data.max_eval_chunks, subset_seed(config))


@dataclass(frozen=True)
class RunChunks:
    """What a training run reads."""

    train_split: datasets.Dataset  # the whole chunked training split (offline answers are keyed by its rows)
    train: datasets.Dataset  # the data.max_train_chunks sample of it, with each row's ``chunk_index`` in the split
    eval: datasets.Dataset  # the data.max_eval_chunks sample of the eval split
    reports: dict[str, DataReport]  # split name -> what chunking did
    train_rows: datasets.Dataset  # ``train`` as the rows the trainer reads: packed when data.packing (fusion.packing)
    packing: PackReport  # what packing did with ``train`` (utilisation)
    # The split the rows' ``chunk_index`` points into, which offline answers are computed over: the
    # pieces when packing cuts chunks (data.min_piece_tokens), else ``train_split``.
    documents: datasets.Dataset


def run_chunks(config: Config, tokenizers: Sequence) -> RunChunks:
    """The training and eval chunks of a run (see :class:`RunChunks`). Evaluation reads one chunk per
    row whatever ``data.packing``: its sample (``data.max_eval_chunks``, ``trainer.eval_batches``) is
    counted in chunks, as ``launch/evaluate.py`` scores them."""
    data, seed = config.data, subset_seed(config)
    train_split, train_report = chunked_split(config, data.train_split, tokenizers)
    eval_split, eval_report = chunked_split(config, data.eval_split, tokenizers)
    train = sample(train_split.add_column("chunk_index", list(range(len(train_split)))), data.max_train_chunks, seed)
    train_rows, pieces, packing = pack_chunks(train, tokenizers[:1 + len(config.sources)], data.max_length, data.packing,
                                              data.min_piece_tokens)
    return RunChunks(train_split, train, eval_sample(config, eval_split),
                     {data.train_split: train_report, data.eval_split: eval_report}, train_rows, packing,
                     train_split if pieces is None else pieces)
