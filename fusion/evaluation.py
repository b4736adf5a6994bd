"""Held-out language-modelling quality per domain: perplexity and bits per byte.

Perplexity is per token of the model's own tokenizer, so it does not compare across
tokenizers; bits per byte (total nats / UTF-8 bytes / ln 2) does. A sequence's first token is
predicted only when the tokenizer prepends BOS; without BOS it is conditioned on nothing and
not scored (both counts below agree on which tokens are scored).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer



def bits_per_byte(nats: float, num_bytes: int) -> float:
    """Total nats over UTF-8 bytes, in bits: the quality measure that compares across tokenizers."""
    return nats / num_bytes / math.log(2) if num_bytes else float("nan")


@dataclass(frozen=True)
class TextScore:
    nll: float  # summed nats over the scored tokens
    tokens: int  # scored (predicted) tokens
    bytes: int  # UTF-8 bytes of the text


@dataclass(frozen=True)
class DomainScore:
    domain: str
    sequences: int
    tokens: int
    bytes: int
    nll: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte(self.nll, self.bytes)

    def to_dict(self) -> dict:
        return {"domain": self.domain, "sequences": self.sequences, "tokens": self.tokens, "bytes": self.bytes,
                "nll": self.nll, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def sequence_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and scored-token count per sequence.

    Args:
        logits: ``[B, L, V]`` (any float dtype; computed in fp32).
        input_ids, attention_mask: ``[B, L]``, right-padded.
    Returns:
        ``(nll[B], count[B])``: position t's logits score token t+1 where both are real tokens.
    """
    targets = input_ids[:, 1:]
    mask = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    token_nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_nll * mask).sum(dim=1), mask.sum(dim=1)


@torch.inference_mode()
def score_texts(model, tokenizer, texts: Sequence[str], batch_size: int, max_length: int,
                progress: str | None = None) -> list[TextScore]:
    """Score each text under a causal LM; texts longer than ``max_length`` tokens raise ValueError."""
    device = next(model.parameters()).device
    scores: list[TextScore] = []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in tqdm(range(0, len(texts), batch_size), desc=progress, disable=progress is None, leave=False):
        batch = list(texts[start:start + batch_size])
        # Special-token strings in the text are text, as in chunking and training.
        encoded = tokenizer(batch, add_special_tokens=True, split_special_tokens=True)["input_ids"]
        too_long = [len(ids) for ids in encoded if len(ids) > max_length]
        if too_long:
            raise ValueError(f"a text tokenises to {max(too_long)} tokens > max_length={max_length}; chunk the corpus first")
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        nll, count = sequence_nll(logits, input_ids.to(device), attention_mask.to(device))
        scores.extend(TextScore(float(n), int(c), len(text.encode("utf-8"))) for n, c, text in zip(nll, count, batch))
    return scores


def evaluate_by_domain(model, tokenizer, texts: Sequence[str], domains: Sequence[str], batch_size: int,
                       max_length: int, progress: str | None = None) -> dict[str, DomainScore]:
    """Per-domain totals (and an ``all`` row) of :func:`score_texts`."""
    scores = score_texts(model, tokenizer, texts, batch_size, max_length, progress)
    totals: dict[str, list] = {}
    for domain, score in zip(domains, scores):
        for key in {domain, "all"}:  # a corpus without domains has one, named "all"
            total = totals.setdefault(key, [0, 0, 0, 0.0])
            total[0] += 1
            total[1] += score.tokens
            total[2] += score.bytes
            total[3] += score.nll
    return {key: DomainScore(key, *values) for key, values in sorted(totals.items(), key=lambda item: (item[0] == "all", item[0]))}


def resolve_model_dir(path: str | Path) -> Path:
    """The HF folder of ``path``: the folder itself, or the ``model/`` a training run writes into its output_dir.

    Raises:
        ValueError: neither ``path`` nor ``path/model`` holds a ``config.json``.
    """
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / "config.json").is_file():
            return candidate
    raise ValueError(f"{path} is not a Hugging Face model folder (no config.json there or in {path / 'model'}); "
                     "pass a folder written by save_pretrained or a run's output_dir")


def evaluate_models(model_dirs: Mapping[str, str | Path], texts: Sequence[str], domains: Sequence[str], batch_size: int,
                    max_length: int, device: torch.device | str = "cpu") -> dict[str, dict[str, DomainScore]]:
    """:func:`evaluate_by_domain` of every model (loaded in fp32, one at a time) on the same texts.

    Args:
        model_dirs: display name -> HF folder (or a run's output_dir, see :func:`resolve_model_dir`).
        texts, domains: the held-out chunks and their domain labels, each fitting ``max_length``
            tokens of every model's tokenizer (chunk them for all of those tokenizers).

    Raises:
        ValueError: a folder is not a model, or a text is longer than ``max_length`` tokens for a model.
    """
    results = {}
    for name, path in model_dirs.items():
        folder = resolve_model_dir(path)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        results[name] = evaluate_by_domain(model, tokenizer, texts, domains, batch_size, max_length, progress=f"evaluate {name}")
        del model
    return results


def scores_to_json(results: Mapping[str, Mapping[str, DomainScore]]) -> dict[str, dict[str, dict]]:
    """``{model: {domain: DomainScore.to_dict()}}``, ready for ``json.dump``."""
    return {name: {domain: score.to_dict() for domain, score in scores.items()} for name, scores in results.items()}


@torch.no_grad()
def sharded_held_out(score_batch: Callable[[dict], tuple[float, int]], rows_by_domain: Mapping[str, Sequence[dict]], collator,
                     micro_batch_size: int, max_batches: int, dp_rank: int, dp_size: int,
                     global_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, DomainScore]:
    """Per-domain held-out scores of a model sharded over ``dp_size`` ranks (the trainer's periodic eval).

    Every rank runs the same number of forward passes (ZeRO-3 gathers are collective); each takes
    its share of every domain's first ``max_batches x dp_size`` micro-batches.

    Args:
        score_batch: ``(summed nats, scored tokens)`` of one collated micro-batch.
        rows_by_domain: per domain, its eval rows (with ``text``).
        collator: rows -> micro-batch (with ``segments``, its documents).
        global_sum: all-reduces a tensor over the ranks.
    """
    results = {}
    per_step = micro_batch_size * dp_size
    for domain, rows in rows_by_domain.items():
        steps = min(max_batches, len(rows) // per_step)
        totals = torch.zeros(3, dtype=torch.float64)  # nats, tokens, bytes
        for index in range(steps):
            start = index * per_step + dp_rank * micro_batch_size
            batch = collator([rows[i] for i in range(start, start + micro_batch_size)])
            nats, tokens = score_batch(batch)
            totals += torch.tensor([nats, tokens, sum(len(text.encode("utf-8")) for text in batch["segments"].texts)],
                                   dtype=torch.float64)
        nats, tokens, num_bytes = global_sum(totals).tolist()
        if tokens:
            results[domain] = DomainScore(domain, steps * per_step, int(tokens), int(num_bytes), nats)
    return results
