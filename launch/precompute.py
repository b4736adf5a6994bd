"""Offline soft labels: run every source over a chunked corpus split and write sharded sparse answers.

    python launch/precompute.py --sources smollm2=assets/models/smollm2-135m gemma3=assets/models/gemma3-270m \\
        --target-tokenizer assets/tokenizers/smollm2 --corpus assets/corpus --split train \\
        --max-length 128 --out runs/answers

Several processes may share the work: rank r of W (``--rank/--world-size``, default from the
RANK/WORLD_SIZE environment of a launcher) computes shards r, r+W, ... An interrupted run is
resumed by running the same command again.
"""
from __future__ import annotations

import argparse
import os
import time

import datasets
import torch
from transformers import AutoTokenizer

from fusion.data import build_chunked_split
from fusion.precompute import precompute


def _source(spec: str) -> tuple[str, str]:
    name, sep, model_dir = spec.partition("=")
    if not sep or not name or not model_dir:
        raise argparse.ArgumentTypeError(f"--sources entry {spec!r} must read NAME=MODEL_DIR")
    return name, model_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs="+", type=_source, required=True, help="NAME=MODEL_DIR of each source")
    parser.add_argument("--target-tokenizer", required=True, help="folder of the target's fast tokenizer")
    parser.add_argument("--corpus", required=True, help="DatasetDict folder (save_to_disk) with a 'text' column")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-length", type=int, required=True, help="tokens per chunk, for every tokenizer")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N chunks (a slice for a quick run)")
    parser.add_argument("--out", required=True, help="output root; source NAME writes to OUT/NAME/")
    parser.add_argument("--shard-size", type=int, default=1024, help="chunks per shard")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="source model dtype")
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    target_tokenizer = AutoTokenizer.from_pretrained(args.target_tokenizer)
    tokenizers = [target_tokenizer] + [AutoTokenizer.from_pretrained(model_dir) for _, model_dir in args.sources]
    split = datasets.load_from_disk(args.corpus)[args.split]
    corpus, _ = build_chunked_split(split, tokenizers, args.max_length)
    if args.limit is not None:
        corpus = corpus.select(range(min(args.limit, len(corpus))))
    started = time.perf_counter()
    reports = precompute(
        args.sources, target_tokenizer, corpus, args.out,
        max_length=args.max_length, shard_size=args.shard_size, top_k=args.top_k, temperature=args.temperature,
        batch_size=args.batch_size, rank=args.rank, world_size=args.world_size, device=args.device,
        model_dtype=getattr(torch, args.dtype), progress=not args.no_progress,
    )
    for name, report in reports.items():
        rate = report.target_tokens / report.seconds if report.seconds else 0.0
        print(
            f"{name}: wrote {len(report.shards_written)} shards, skipped {len(report.shards_skipped)} complete ones, "
            f"{report.sequences} chunks, {report.target_tokens} target tokens in {report.seconds:.1f} s ({rate:.0f} tokens/s)"
        )
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
