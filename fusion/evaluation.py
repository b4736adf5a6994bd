"""Held-out language-modelling quality per domain: perplexity and bits per byte.

Perplexity is per token of the model's own tokenizer, so it does not compare across
tokenizers; bits per byte (total nats / UTF-8 bytes / ln 2) does. A sequence's first token is
predicted only when the tokenizer prepends BOS; without BOS it is conditioned on nothing and
not scored (both counts below agree on which tokens are scored).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


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
        return self.nll / self.bytes / math.log(2) if self.bytes else float("nan")

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
        encoded = tokenizer(batch, add_special_tokens=True)["input_ids"]
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
        for key in (domain, "all"):
            total = totals.setdefault(key, [0, 0, 0, 0.0])
            total[0] += 1
            total[1] += score.tokens
            total[2] += score.bytes
            total[3] += score.nll
    return {key: DomainScore(key, *values) for key, values in sorted(totals.items(), key=lambda item: (item[0] == "all", item[0]))}
