"""Domain specialists: the real pretrained sources, continued-pretrained on one domain each.

A specialist starts from one of the exported pretrained models (``assets/models/<base>``) and
continues its pretraining on the train split of one domain of the corpus, so that the pool has,
per domain, a source that knows that kind of text better than both generalists, with the
generalists' own tokenizers (two families: SmolLM2's byte-level BPE, Gemma-3's SentencePiece).

Only the last ``train_layers`` decoder layers and the final norm are trained; the embeddings (tied
to the LM head) and the lower layers stay frozen. That keeps one step on this 2-core machine at a
few seconds and leaves the model a good generalist below the top layers, which is what
continued pretraining with a modest budget gives in practice too.

The stage is deterministic (one process, seeded data order, no dropout) and resumable: every
``checkpoint_every`` steps the trained parameters, the optimizer and the scheduler are written to
``<out>.partial/resume.pt``; an interrupted build continues from the last one. The finished model
(stored in bfloat16 like its base) is renamed into place with ``training.json``, the record of
what was trained, its losses and its cost.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion.data import chunk_documents

RECORD_NAME = "training.json"
RESUME_NAME = "resume.pt"


@dataclass(frozen=True)
class SpecialistSpec:
    """One continued-pretraining run: ``base`` (a folder of assets/models) on ``domain``."""

    name: str
    base: str
    domain: str
    train_layers: int = 6
    steps: int = 120
    batch_size: int = 8
    max_length: int = 128
    lr: float = 5e-4
    warmup_steps: int = 6
    checkpoint_every: int = 20


SPECIALISTS = (
    SpecialistSpec("code-smollm2", "smollm2-135m", "code", steps=240),
    # Not ahead of Gemma-3 on bible (1.037 vs 0.999 bpb). Gemma-3 continued on bible got worse, at lr 8e-4
    # with 6 layers (1.106) and at the Shakespeare recipe below (1.037); SmolLM2 with all 30 layers for
    # 200 steps reached 0.965 (+0.034, 0.1 short of the bar) at 7 s a step: see docs/RESULTS.md.
    SpecialistSpec("bible-smollm2", "smollm2-135m", "bible"),
    SpecialistSpec("shakespeare-gemma3", "gemma3-270m", "shakespeare", train_layers=4, batch_size=4, steps=150),
)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder stack of a Llama/Gemma-style causal LM (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers decoder stack to continue training")
    return layers


def trainable_parameters(model, train_layers: int) -> dict[str, torch.nn.Parameter]:
    """Freeze everything but the last ``train_layers`` decoder layers and the final norm; return those."""
    layers = decoder_layers(model)
    if not 1 <= train_layers <= len(layers):
        raise ValueError(f"train_layers={train_layers} must be in [1, {len(layers)}] for this model")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trained = [*layers[len(layers) - train_layers:], model.model.norm]
    for module in trained:
        for parameter in module.parameters():
            parameter.requires_grad_(True)
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


def batch_order(num_chunks: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Chunk indices of every step: epochs of seeded permutations, consumed ``batch_size`` at a time."""
    rng = random.Random(seed)
    order: list[int] = []
    batches = []
    for _ in range(steps):
        while len(order) < batch_size:
            epoch = list(range(num_chunks))
            rng.shuffle(epoch)
            order.extend(epoch)
        batches.append(order[:batch_size])
        del order[:batch_size]
    return batches


def learning_rate_factor(step: int, spec: SpecialistSpec) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at ``spec.steps``."""
    warmup = min(1.0, (step + 1) / max(1, spec.warmup_steps))
    return warmup * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / spec.steps)))


def train_specialist(spec: SpecialistSpec, train_texts: list[str], models_dir: Path, seed: int) -> dict:
    """Continue ``spec.base`` on ``train_texts`` (documents of ``spec.domain``) and save it as ``models_dir/spec.name``.

    Returns the record written to ``training.json``.
    """
    base_dir, out_dir = models_dir / spec.base, models_dir / spec.name
    partial = out_dir.with_name(out_dir.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    chunks, _, _ = chunk_documents(train_texts, [spec.domain] * len(train_texts), [tokenizer], spec.max_length)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.train()
    trained = trainable_parameters(model, spec.train_layers)
    optimizer = torch.optim.AdamW(trained.values(), lr=spec.lr, weight_decay=0.0, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, spec))
    batches = batch_order(len(chunks), spec.steps, spec.batch_size, seed)
    losses: list[float] = []
    seconds = 0.0
    resume = partial / RESUME_NAME
    if resume.is_file():
        state = torch.load(resume, weights_only=False)
        model.load_state_dict(state["trained"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        losses, seconds = state["losses"], state["seconds"]
    progress = tqdm(range(len(losses), spec.steps), initial=len(losses), total=spec.steps, desc=f"train {spec.name}")
    for step in progress:
        started = time.time()
        encoded = tokenizer([chunks[index] for index in batches[step]], padding=True, return_tensors="pt",
                            split_special_tokens=True)
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        loss = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(trained.values()), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        seconds += time.time() - started
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % spec.checkpoint_every == 0 and step + 1 < spec.steps:
            state = {"trained": {name: parameter.detach() for name, parameter in trained.items()},
                     "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     "losses": losses, "seconds": seconds}
            torch.save(state, resume.with_suffix(".tmp"))
            resume.with_suffix(".tmp").replace(resume)
    record = {"spec": asdict(spec), "seed": seed, "train_chunks": len(chunks),
              "trained_parameters": sum(parameter.numel() for parameter in trained.values()),
              "parameters": sum(parameter.numel() for parameter in model.parameters()),
              "train_tokens": spec.steps * spec.batch_size * spec.max_length, "seconds": round(seconds, 1),
              "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:])}
    model.to(torch.bfloat16).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    resume.unlink(missing_ok=True)
    (partial / RECORD_NAME).write_text(json.dumps(record, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.replace(out_dir)
    return record


def ensure_specialist(spec: SpecialistSpec, corpus_train, models_dir: Path, seed: int) -> Path:
    """Train ``spec`` into ``models_dir/<name>`` unless it is already there (cached; resumes a partial one)."""
    out_dir = models_dir / spec.name
    if (out_dir / RECORD_NAME).is_file():
        return out_dir
    if not (models_dir / spec.base / "config.json").is_file():
        raise FileNotFoundError(f"{spec.name}: its base model {models_dir / spec.base} is missing; build the 'sources' stage first")
    texts = [row["text"] for row in corpus_train if row["domain"] == spec.domain]
    if not texts:
        raise ValueError(f"{spec.name}: the corpus has no training documents of domain {spec.domain!r}")
    train_specialist(spec, texts, models_dir, seed)
    return out_dir
