"""Row utilisation of a run's training split, one chunk per row against packed rows, per domain.

The split is chunked for the config's target and every source (``fusion.splits.run_tokenizers``) at
each ``--max-length``, then laid out three ways by ``fusion.packing.pack_chunks``: one chunk per row,
rows of whole chunks (``data.min_piece_tokens: null``) and ``packed``, what ``data.packing: true``
gives with the config's ``data.min_piece_tokens`` (chunks cut into pieces that fill the rows; the
same as whole chunks when it is null). Utilisation is real target tokens over the rows'
``max_length`` slots; all layouts are measured in the same run on the same chunks. Writes JSON; the
last line printed is ``bar: min_packed_utilisation <x>`` (the lowest domain of ``packed`` at the
largest ``--max-length``; issue 14's bar is 0.95); the exit status is 0 whether or not a bar is met.

    python benchmarks/packing.py [--config configs/demo.yaml] [--max-length 2048 ...] [--out benchmarks/results/packing.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fusion.config import load_config
from fusion.packing import pack_chunks
from fusion.splits import chunked_split, run_tokenizers

ROOT = Path(__file__).resolve().parents[1]


def measure(config, tokenizers, max_length: int) -> dict:
    started = time.perf_counter()
    chunks, _ = chunked_split(config, config.data.train_split, tokenizers)
    chunk_seconds = time.perf_counter() - started
    result = {"chunks": len(chunks), "chunk_s": round(chunk_seconds, 1)}
    layouts = (("one_chunk_per_row", False, None), ("whole_chunks", True, None), ("packed", True, config.data.min_piece_tokens))
    for name, packing, min_piece_tokens in layouts:
        started = time.perf_counter()
        _, _, report = pack_chunks(chunks, tokenizers, max_length, packing, min_piece_tokens)
        result[name] = {"rows": report.rows, "documents": report.documents, "utilisation": round(report.utilisation, 4),
                        "seconds": round(time.perf_counter() - started, 1),
                        "by_domain": {domain: round(value, 4) for domain, value in report.domain_utilisation().items()}}
    result["min_piece_tokens"] = config.data.min_piece_tokens
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--max-length", type=int, nargs="+", default=[2048])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "packing.json"))
    args = parser.parse_args()
    tokenizers = run_tokenizers(load_config(args.config))
    results = {}
    for max_length in sorted(args.max_length):
        # Only the tokenizers are used: a length past the demo models' context (512) is still measured.
        config = load_config(args.config, [f"data.max_length={max_length}"], check_paths=False)
        results[max_length] = measure(config, tokenizers, max_length)
        print(json.dumps({max_length: results[max_length]}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "tokenizers": [t.name_or_path for t in tokenizers], "results": results}, indent=1))
    largest = results[max(results)]["packed"]["by_domain"]
    print(f"bar: min_packed_utilisation {min(largest.values()):.4f}")


if __name__ == "__main__":
    main()
