"""Held-out perplexity and bits per byte, per domain, of trained models, checkpoints and the sources.

    python launch/evaluate.py --config configs/compare.yaml --model runs/demo/model [--model name=path ...]
                              [--target] [--sources] [--split validation] [--out eval.json]

A ``--model`` path is a Hugging Face folder, a run's output_dir (its ``model/``), or a DeepSpeed
checkpoint of a run (``<output_dir>/checkpoints``: the latest; or one tag folder in it), whose
weights are gathered into the config's target architecture. Every model is scored on the same chunks: the config's corpus split, chunked for the target's,
every source's and every given model's tokenizer (``data.max_length``). Perplexity is per token
of each model's own tokenizer; bits per byte compares across tokenizers. Writes JSON
``{"split", "chunks", "models": {name: {domain: {perplexity, bits_per_byte, nll, tokens, bytes, sequences}}}}``
(domain ``all`` pools every chunk).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from fusion.config import ConfigError, load_config
from fusion.export import export_checkpoint, is_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run YAML: corpus, eval split, max_length, target and sources")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key (repeatable)")
    parser.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH",
                        help="HF folder, run output_dir or DeepSpeed checkpoint (repeatable); NAME defaults to the folder name")
    parser.add_argument("--target", action="store_true", help="also evaluate the config's target (before training)")
    parser.add_argument("--sources", action="store_true", help="also evaluate every source of the config")
    parser.add_argument("--split", default=None, help="corpus split (default: data.eval_split)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="JSON output path (default: print to stdout)")
    return parser.parse_args(argv)


def model_arguments(values: list[str]) -> dict[str, str]:
    """``NAME=PATH`` or ``PATH`` arguments as ``{name: path}``; raises ValueError on a repeated name."""
    models = {}
    for value in values:
        name, _, path = value.rpartition("=") if "=" in value else (None, "", value)
        name = name or Path(path.rstrip("/")).name
        if name in models:
            raise ValueError(f"--model: the name {name!r} is given twice; name them with NAME=PATH")
        models[name] = path
    return models


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from fusion.evaluation import evaluate_models, resolve_model_dir, scores_to_json
    from fusion.splits import held_out_chunks, run_tokenizers

    try:
        config = load_config(args.config, args.set)
        models = model_arguments(args.model)
        for path in models.values():
            if not is_checkpoint(path):
                resolve_model_dir(path)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    exported = tempfile.TemporaryDirectory(prefix="evaluate-")
    try:
        for name, path in models.items():
            if is_checkpoint(path):
                models[name] = export_checkpoint(path, config.target, Path(exported.name) / name)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.target:
        models.setdefault("target", config.target)
    if args.sources:
        models.update({source.name: source.path for source in config.sources})
    if not models:
        print("error: nothing to evaluate; pass --model, --target or --sources", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print(f"error: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    split = args.split or config.data.eval_split
    try:
        chunks = held_out_chunks(config, split, run_tokenizers(config, [resolve_model_dir(path) for path in models.values()]))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = evaluate_models(models, chunks["text"], chunks["domain"], args.batch_size, config.data.max_length, args.device)
    report = {"split": split, "chunks": len(chunks), "models": scores_to_json(results)}
    text = json.dumps(report, indent=2) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        for name, scores in results.items():
            print(f"{name}: " + ", ".join(f"{domain} {score.bits_per_byte:.3f} bpb" for domain, score in scores.items()))
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
