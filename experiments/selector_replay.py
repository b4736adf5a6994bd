"""Replay the ``predictive`` selector of a comparison run over its precomputed answers, without training
the target: the choices, the source tokens and the held-out routing it reports are the real run's.

The selector reads only the target ids and the scores of the sources that ran (``linucb`` and the
other objectives alike), and offline answers do not depend on the target, so each step here makes
the run's calls (``choose``, ``collect``, ``weigh``, ``learn``) on the same batches in the same order
and skips the target's forward and backward. That makes a settings sweep of the selector cost about
30-60 s per seed here instead of the two minutes of a comparison run (checked: seeds 1-3 with the
comparison's settings reproduce its held-out routing).

Reads a comparison's ``--out`` folder (``launch/compare.py``): its ``base.yaml`` (the config every
run starts from, answers and corpus sample included) and ``truth.json`` (the ground truth, for the
best source per domain). The entry point is ``launch/replay_selector.py``.
"""
from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch
import yaml

from experiments.comparison import best_sources, held_out_routing
from fusion.config import apply_overrides, parse_config
from fusion.data import TextBatchCollator, iterate_epochs, make_dataloader
from fusion.policies import make_policy, tokenizer_families
from fusion.sources.pool import OfflineSources
from fusion.splits import held_out_chunks, run_chunks, run_tokenizers
from fusion.vocab_map import tokenizer_sha256


def replay(config, tokenizers, chunks, held_out, best: dict[str, str]) -> dict:
    """One seed's run of the selector alone: its source tokens (the sources' own counters, as a
    comparison run counts them) and held-out best-source shares."""
    sources = OfflineSources(config.sources, Path(config.fusion.answers_dir), tokenizers[0], config.fusion.top_k,
                             config.fusion.temperature, chunks.documents)
    target_tokenizer = tokenizers[0]
    if target_tokenizer.pad_token is None:
        target_tokenizer.pad_token = target_tokenizer.eos_token
    loader = make_dataloader(chunks.train_rows, TextBatchCollator(target_tokenizer, config.data.max_length),
                             config.trainer.micro_batch_size, 0, 1, config.run.seed, shuffle=True)
    policy = make_policy(config, len(config.sources), vocab_size=len(target_tokenizer), device=torch.device("cpu"),
                         seed=config.run.seed, average_gradients=lambda grads: None, sum_over_ranks=lambda value: value,
                         families=tokenizer_families([tokenizer_sha256(t) for t in tokenizers[1:]]))
    batches = (batch for _, batch in iterate_epochs(loader))
    available = torch.ones(len(config.sources), dtype=torch.bool)
    for step in range(1, config.trainer.max_steps + 1):
        for _ in range(config.trainer.gradient_accumulation_steps):
            batch = next(batches)
            chosen = policy.choose(batch, available, step)
            answers, ran = sources.collect(sources.request(batch, chosen, step))
            policy.weigh(batch, answers, ran)
            policy.learn(batch, answers, ran)
    with tempfile.TemporaryDirectory() as folder:
        selector_file = Path(folder) / "selector.pt"
        policy.save(selector_file, [source.name for source in config.sources])
        routing = held_out_routing(config, selector_file, held_out["text"], held_out["domain"])
    return {"seed": config.run.seed, "source_tokens": sum(counters.tokens for counters in sources.counters),
            "best_source_share": {domain: routing[domain][best[domain]] for domain in sorted(routing)}}


def replay_comparison(folder: Path, seeds: Sequence[int], overrides: Sequence[str] = (),
                      report: Callable[[dict], None] = lambda run: None) -> dict:
    """Every seed's replay of the comparison in ``folder`` with the config ``overrides`` (``KEY=VALUE``)
    applied; ``report`` is called with each seed's result as it is done. Returns them and their mean."""
    raw = apply_overrides(yaml.safe_load((folder / "base.yaml").read_text()), list(overrides))
    raw.setdefault("fusion", {})["mode"] = "predictive"
    truth = {name: {domain: score["bits_per_byte"] for domain, score in scores.items()}
             for name, scores in json.loads((folder / "truth.json").read_text())["models"].items()}
    config = parse_config(copy.deepcopy(raw))
    tokenizers = run_tokenizers(config)
    chunks = run_chunks(config, tokenizers)
    held_out = held_out_chunks(config, config.data.eval_split, tokenizers)
    best = best_sources(truth, [source.name for source in config.sources])
    runs = []
    for seed in seeds:
        seeded = copy.deepcopy(raw)
        seeded.setdefault("run", {})["seed"] = seed
        runs.append(replay(parse_config(seeded), tokenizers, chunks, held_out, best))
        report(runs[-1])
    domains = runs[0]["best_source_share"]
    return {"comparison": str(folder), "overrides": list(overrides), "best_source": best, "runs": runs,
            "mean": {"source_tokens": sum(run["source_tokens"] for run in runs) / len(runs),
                     "best_source_share": {domain: sum(run["best_source_share"][domain] for run in runs) / len(runs)
                                           for domain in domains}}}
