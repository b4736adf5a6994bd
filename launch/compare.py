"""Compare fusion modes on one budget: train every (mode, source pool, seed), evaluate, tabulate, plot.

    python launch/compare.py --config configs/compare.yaml --out runs/compare --report-dir docs/results \
        [--seeds 1 2 3] [--jobs 2] [--modes none min_ce ...] [--pools gemma3,code-smollm2 ...] [--set selector.tau=0.2] \
        [--reuse docs/results/compare.json]

1. A balanced training corpus: ``--per-domain`` chunks of every domain drawn from the config's
   training split (``--data-seed``), and the whole eval split, saved to ``<out>/corpus``; every
   run and seed trains on exactly these chunks.
2. The ground truth: every source's held-out bits per byte per domain on ``--truth-per-domain`` eval
   chunks of each domain (``<out>/truth.json``), what the reference modes (``domain_oracle``,
   ``best_single``, ``static_top_k``) route by and what the bar's routing check compares against.
3. Offline answers of every source over it (``launch/precompute.py``, once; resumes), so all
   modes see identical source outputs; a mode reads only the answers of the sources it chose,
   and its source compute is the target tokens of the sequences it sent to each source.
4. One training run per (mode, pool, seed), ``--jobs`` at once, in ``<out>/runs/<name>-<hash>`` (the hash covers the
   settings, so a rerun with other settings never reuses a run); runs with a ``result.json`` are
   skipped, so an interrupted comparison resumes by running the same command. With ``--reuse``, runs
   named in an earlier ``compare.json`` on the same ground truth are taken from it (a change of the
   selector's settings then trains only the modes that read them).
5. Held-out bits per byte of every run's model on the eval split (``heldout.json`` next to it), and
   for ``predictive`` the trained selector's routing on the held-out chunks (``heldout_routing.json``).
   Eval domains that the training sample lacks (held out of training altogether) are reported
   beside the others and kept out of the mean and the interference.
6. ``compare.md``, ``compare.json`` and PNG plots in ``--report-dir``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

# Runs as a script from the repository root: the experiment harness lives beside the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.local_runs import single_node_command  # noqa: E402
from fusion.config import FUSION_MODES, ConfigError, apply_overrides, parse_config  # noqa: E402



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/compare.yaml", help="base run YAML (target, every source, budget)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one base key (repeatable)")
    parser.add_argument("--out", default="runs/compare", help="corpus, answers, runs and logs go here")
    parser.add_argument("--report-dir", default=None, help="where compare.md/json and the PNGs go (default: <out>/report)")
    parser.add_argument("--modes", nargs="+", default=list(FUSION_MODES), choices=FUSION_MODES)
    parser.add_argument("--pools", nargs="*", default=["gemma3,code-smollm2", "gemma3,code-smollm2,bible-smollm2,bible-mistral"],
                        help="smaller source pools (comma-separated names); the full pool (every config source) is added")
    parser.add_argument("--pool-modes", nargs="*", default=["all_uniform", "predictive"], choices=FUSION_MODES,
                        help="modes also run with the smaller pools")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=1, help="training runs at once (one torch thread each)")
    parser.add_argument("--truth-per-domain", type=int, default=48,
                        help="held-out chunks per domain on which every source is scored: the ground truth of the reference modes")
    parser.add_argument("--per-domain", type=int, default=100, help="training chunks per domain")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the training-chunk sample (fixed across run seeds)")
    parser.add_argument("--tolerance", type=float, default=0.0, help="a domain counts as degraded when δ > this (bpb)")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=100, help="chunks per precomputed answer shard")
    parser.add_argument("--reuse", default=None, metavar="COMPARE_JSON",
                        help="an earlier comparison's compare.json on the same ground truth: its runs stand in for runs "
                             "of the same name (same mode, seed and settings), which are then not trained again")
    return parser.parse_args(argv)


def build_corpus(config, out: Path, per_domain: int, data_seed: int) -> Path:
    """The balanced training sample and the eval split as a ``save_to_disk`` corpus (kept if already built)."""
    import datasets

    from experiments.comparison import balanced_sample
    from fusion.splits import chunked_split, run_tokenizers

    corpus_dir = out / "corpus"
    recipe = {"corpus": config.data.corpus, "per_domain": per_domain, "data_seed": data_seed, "max_length": config.data.max_length,
              "sources": [source.path for source in config.sources]}
    recipe_file = out / "corpus.json"
    if corpus_dir.is_dir():
        made = json.loads(recipe_file.read_text()) if recipe_file.is_file() else None
        if made != recipe:
            raise ValueError(f"{corpus_dir} was built from {made}, not {recipe}; use another --out or delete it")
        return corpus_dir
    tokenizers = run_tokenizers(config)
    splits = {split: chunked_split(config, split, tokenizers)[0] for split in (config.data.train_split, config.data.eval_split)}
    splits[config.data.train_split] = balanced_sample(splits[config.data.train_split], per_domain, data_seed)
    datasets.DatasetDict(splits).save_to_disk(str(corpus_dir))
    recipe_file.write_text(json.dumps(recipe, indent=2) + "\n")
    return corpus_dir


def train(config_file: Path, log_file: Path) -> None:
    """One single-rank training run; raises RuntimeError with the log's tail when it fails."""
    command = single_node_command("launch/train.py", config_file, world_size=1)
    with log_file.open("w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              check=False).returncode
    if code != 0:
        tail = log_file.read_text()[-2000:]
        raise RuntimeError(f"training with {config_file} failed (exit {code}); log {log_file}:\n{tail}")


def ground_truth(config, chunks, per_domain: int, out: Path, batch_size: int) -> Path:
    """Every source's held-out bits per byte per domain on the first ``per_domain`` eval chunks of each
    domain (``launch/evaluate.py`` format, kept in ``<out>/truth.json`` while its recipe holds)."""
    from fusion.evaluation import evaluate_models, scores_to_json

    path = out / "truth.json"
    recipe = {"sources": {source.name: source.path for source in config.sources}, "per_domain": per_domain,
              "chunks": len(chunks)}
    if path.is_file() and json.loads(path.read_text()).get("recipe") == recipe:
        return path
    picked: dict[str, list[int]] = {}
    for index, domain in enumerate(chunks["domain"]):
        if len(picked.setdefault(domain, [])) < per_domain:
            picked[domain].append(index)
    rows = chunks.select(sorted(index for indices in picked.values() for index in indices))
    scores = evaluate_models({source.name: source.path for source in config.sources}, rows["text"], rows["domain"],
                             batch_size, config.data.max_length)
    path.write_text(json.dumps({"recipe": recipe, "models": scores_to_json(scores)}, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        raw = apply_overrides(yaml.safe_load(Path(args.config).read_text()) or {}, args.set)
        config = parse_config(raw)
        names = [source.name for source in config.sources]
        pools = [pool.split(",") for pool in args.pools] + [names]
        from experiments.comparison import run_matrix

        specs = run_matrix(args.modes, pools, args.pool_modes, args.seeds)
        if args.jobs < 1 or args.truth_per_domain < 1:
            raise ValueError(f"--jobs ({args.jobs}) and --truth-per-domain ({args.truth_per_domain}) must be >= 1")
    except (ConfigError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from concurrent.futures import ThreadPoolExecutor

    import datasets
    import torch
    from tqdm.auto import tqdm

    from experiments import comparison
    from fusion.config import read_ground_truth
    from fusion.evaluation import evaluate_models
    from fusion.policies import POLICIES, Predictive
    from fusion.splits import held_out_chunks, run_tokenizers

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    try:
        corpus_dir = build_corpus(config, out, args.per_domain, args.data_seed)
    except (ValueError, ConfigError) as error:
        print(f"error: --per-domain / --out: {error}", file=sys.stderr)
        return 2
    shared = {"data": {"corpus": str(corpus_dir)}, "fusion": {"offline": True, "answers_dir": str(out / "answers")}}
    # Every source of the full pool: precompute answers all of them, and eval chunks fit all their tokenizers.
    base_raw = comparison.run_config(raw, comparison.RunSpec("predictive", tuple(names), args.seeds[0]), str(out / "base"), shared)
    eval_config = parse_config(base_raw)
    chunks = held_out_chunks(eval_config, eval_config.data.eval_split, run_tokenizers(eval_config))
    truth = read_ground_truth(str(ground_truth(eval_config, chunks, args.truth_per_domain, out, args.eval_batch_size)))
    trained_domains = set(datasets.load_from_disk(str(corpus_dir))[eval_config.data.train_split]["domain"])
    unseen = tuple(sorted(set(chunks["domain"]) - trained_domains))
    # The reference modes route by the training domains' scores (a source's mean leaves unseen domains out).
    truth_file = out / "truth_trained.json"
    truth_file.write_text(json.dumps({"models": {name: {domain: {"bits_per_byte": bpb} for domain, bpb in scores.items()
                                                        if domain in trained_domains} for name, scores in truth.items()}},
                                     indent=2) + "\n")
    shared["fusion"]["ground_truth"] = str(truth_file)
    base_raw["fusion"]["ground_truth"] = str(truth_file)
    base_file = out / "base.yaml"
    base_file.write_text(yaml.safe_dump(base_raw))
    if any(spec.sources for spec in specs):
        precompute = [sys.executable, "launch/precompute.py", "--config", str(base_file), "--shard-size", str(args.shard_size)]
        if subprocess.run(precompute, env={**os.environ, "OMP_NUM_THREADS": str(args.jobs)}, check=False).returncode != 0:
            print(f"error: precomputing the answers failed: {' '.join(precompute)}", file=sys.stderr)
            return 1

    reused = {}
    if args.reuse:
        try:
            reused = comparison.reusable_runs(json.loads(Path(args.reuse).read_text()), truth)
        except (OSError, ValueError) as error:
            print(f"error: --reuse {args.reuse}: {error}", file=sys.stderr)
            return 2
    (out / "configs").mkdir(exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    run_dirs, run_configs, pending = {}, {}, []
    for spec in specs:
        run_raw = comparison.run_config(raw, spec, "", shared)
        name = f"{spec.name}-{comparison.run_key(run_raw)}"
        run_dir = out / "runs" / name
        run_raw["run"]["output_dir"] = str(run_dir)
        run_dirs[spec], run_configs[spec] = run_dir, run_raw
        if name not in reused and not (run_dir / "result.json").is_file():
            config_file = out / "configs" / f"{name}.yaml"
            config_file.write_text(yaml.safe_dump(run_raw))
            pending.append((config_file, out / "logs" / f"{name}.log"))
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(pending), desc="runs", unit="run") as progress:
        for _ in pool.map(lambda job: train(*job), pending):
            progress.update()

    outcomes, seconds = [], {}
    for spec, run_dir in run_dirs.items():
        if run_dir.name in reused:
            record = reused[run_dir.name]
            outcomes.append(comparison.RunOutcome(spec, record["bits_per_byte"], record["source_tokens"],
                                                  record["heldout_routing"], unseen))
            seconds[spec] = record["seconds"]
            continue
        heldout = run_dir / "heldout.json"
        if not heldout.is_file():
            scores = evaluate_models({spec.name: run_dir}, chunks["text"], chunks["domain"], args.eval_batch_size,
                                     eval_config.data.max_length)[spec.name]
            heldout.write_text(json.dumps({domain: score.to_dict() for domain, score in scores.items()}, indent=2) + "\n")
        routing = {}
        if issubclass(POLICIES[spec.mode], Predictive):
            routing_file = run_dir / "heldout_routing.json"
            if not routing_file.is_file():
                routed = comparison.held_out_routing(parse_config(run_configs[spec]), run_dir / "selector.pt",
                                                     chunks["text"], chunks["domain"])
                routing_file.write_text(json.dumps(routed, indent=2) + "\n")
            routing = json.loads(routing_file.read_text())
        bits = {domain: row["bits_per_byte"] for domain, row in json.loads(heldout.read_text()).items()}
        result = json.loads((run_dir / "result.json").read_text())
        tokens = {name: row["tokens"] for name, row in result.get("sources", {}).items()}
        outcomes.append(comparison.RunOutcome(spec, bits, tokens, routing, unseen))
        seconds[spec] = result["seconds"]

    summaries = comparison.summarise(outcomes, args.tolerance)
    report_dir = Path(args.report_dir) if args.report_dir else out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    table = comparison.markdown_table(summaries)
    plots = comparison.plot_comparison(summaries, report_dir)
    try:
        bar = comparison.check_bar(summaries, truth)
    except ValueError as error:
        bar = [(str(error), False)]
    bar_lines = "\n".join(f"- [{'x' if met else ' '}] {text}" for text, met in bar)
    routing_table = comparison.routing_markdown(summaries, truth)
    (report_dir / "compare.md").write_text(table + "\n" + bar_lines + "\n\n" + routing_table)
    (report_dir / "compare.json").write_text(json.dumps({
        "runs": [{"name": run_dirs[o.spec].name, "mode": o.spec.mode, "sources": list(o.spec.sources), "seed": o.spec.seed,
                  "bits_per_byte": o.bits_per_byte, "source_tokens": o.source_tokens, "heldout_routing": o.routing,
                  "seconds": seconds[o.spec], **({"reused_from": args.reuse} if run_dirs[o.spec].name in reused else {})}
                 for o in outcomes],
        "unseen_domains": list(unseen),
        "ground_truth": truth,
        "bar": [{"claim": text, "met": met} for text, met in bar],
    }, indent=2) + "\n")
    print(table)
    print(bar_lines)
    print(routing_table)
    print(f"wrote {report_dir / 'compare.md'}, {report_dir / 'compare.json'} and {', '.join(str(p) for p in plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
