"""Offline soft labels: run every source of a run config over its chunked corpus split and
write sharded sparse answers to ``fusion.answers_dir``.

    python launch/precompute.py --config configs/colocated.yaml [--split train] [--limit N]

The chunks are those the trainer reads (same tokenizers, ``data.max_length`` and chunk cache,
and for the training split the same ``data.max_train_chunks`` sample, drawn with
``data.subset_seed``, default ``run.seed``); every answer keeps its row of the whole split. When
packing cuts chunks (``data.packing`` with ``data.min_piece_tokens``), the trainer's documents are
the pieces of that sample (``fusion.packing``), and the answers are computed per piece, each
keeping its row among the pieces.
Several processes may share the work: rank r of W (``--rank/--world-size``, default from a
launcher's RANK/WORLD_SIZE) computes shards r, r+W, ... An interrupted run resumes by running
the same command again; finished shards are kept.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from fusion.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run YAML (target, sources, data, fusion.top_k/temperature/answers_dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key (repeatable)")
    parser.add_argument("--split", default=None, help="corpus split (default: data.train_split)")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N of those chunks (a slice for a quick run)")
    parser.add_argument("--shard-size", type=int, default=1024, help="chunks per shard")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK", "0")))
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.set)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not config.sources:
        print("error: sources: the config lists no sources to precompute", file=sys.stderr)
        return 2
    from fusion.precompute import precompute
    from fusion.splits import chunked_split, run_chunks, run_tokenizers, subset_rows, subset_seed

    tokenizers = run_tokenizers(config)
    target_tokenizer = tokenizers[0]
    split_name = args.split or config.data.train_split
    try:
        corpus, _ = chunked_split(config, split_name, tokenizers)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = None
    if split_name == config.data.train_split and config.data.packing and config.data.min_piece_tokens is not None:
        # The trainer's documents are pieces of its sample's chunks: answers are stored per piece.
        corpus = run_chunks(config, tokenizers).documents
    elif split_name == config.data.train_split:
        rows = subset_rows(len(corpus), config.data.max_train_chunks, subset_seed(config))
    if args.limit is not None:
        rows = (rows if rows is not None else list(range(len(corpus))))[:args.limit]
    started = time.perf_counter()
    try:
        reports = precompute(
            config.sources, target_tokenizer, corpus,
            Path(config.fusion.answers_dir),
            max_length=config.data.max_length, shard_size=args.shard_size, top_k=config.fusion.top_k,
            temperature=config.fusion.temperature, batch_size=args.batch_size, rank=args.rank, world_size=args.world_size,
            device=args.device, progress=not args.no_progress, rows=rows,
        )
    except ValueError as error:  # bad --rank/--shard-size, or an answers folder made with other settings
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, report in reports.items():
        rate = report.target_tokens / report.seconds if report.seconds else 0.0
        print(
            f"{name}: wrote {len(report.shards_written)} shards, skipped {len(report.shards_skipped)} complete ones, "
            f"{report.sequences} documents, {report.target_tokens} target tokens in {report.seconds:.1f} s ({rate:.0f} tokens/s)"
        )
    print(f"total {time.perf_counter() - started:.1f} s; answers in {config.fusion.answers_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
