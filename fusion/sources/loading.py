"""Opening one source: its model and the scorer that turns its logits into sparse target answers.

Every place that scores with a source (colocated pools, engine groups, the offline precompute)
builds its scorer here, so the vocabulary map, top-k, temperature and truncation are the same
wherever a source runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion.sources.scoring import HiddenStates, SourceScorer
from fusion.vocab_map import VocabMap

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Largest difference from the model's own logits, relative to their largest magnitude, at which the
# head-chunked forward is taken to compute the same logits (the same kernels on fewer rows).
HEAD_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def load_causal_lm(model_dir: str | Path, dtype: str | torch.dtype, attention: str = "sdpa") -> torch.nn.Module:
    """An eval-mode CausalLM from a Hugging Face folder (``dtype``: a ``DTYPES`` name or a torch dtype;
    ``attention``: the ``attn_implementation``, ``sdpa`` | ``flash_attention_2`` | ``eager``)."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attention).eval()


class HeadChunkedForward:
    """A CausalLM's forward that stops before the LM head and returns ``HiddenStates``.

    The scorer then makes logits for ``chunk_rows`` positions at a time (``next_token_topk``), so
    the full ``[B, L, V]`` logits (8.6 GB for 8 x 2,048 positions of a 262k vocabulary in bf16) never
    exist. The head is the output embedding followed by the final-logit soft-capping of the models
    that have it (Gemma 2/3, ``config.final_logit_softcapping``); ``head_chunked`` checks on a short
    input that this reproduces the model's own logits before anything uses it.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.output_embeddings = model.get_output_embeddings()
        self.vocab_size = vocab_size_of(model)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> HiddenStates:
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return HiddenStates(hidden, self.logits, self.vocab_size)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[n, H]`` final hidden states -> ``[n, V]`` logits, as the model's forward makes them."""
        logits = self.output_embeddings(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def head_chunked(model: torch.nn.Module) -> HeadChunkedForward | torch.nn.Module:
    """``HeadChunkedForward(model)`` where it gives the model's own logits on a short probe, else the model
    itself (its full logits: correct, only larger), e.g. for an architecture that scales its logits otherwise."""
    try:
        chunked = HeadChunkedForward(model)
    except AttributeError:  # no output embeddings: not a Hugging Face CausalLM
        return model
    parameter = next(model.parameters())
    probe = torch.arange(min(16, chunked.vocab_size), device=parameter.device).unsqueeze(0)
    mask = torch.ones_like(probe)
    with torch.inference_mode():
        full = model(input_ids=probe, attention_mask=mask).logits[0].float()
        hidden = chunked(probe, mask).hidden[0]
        rows = torch.cat([chunked.logits(hidden[:1]), chunked.logits(hidden[1:])]).float()
    tolerance = HEAD_CHECK_TOLERANCE[parameter.dtype]
    same = rows.shape == full.shape and bool((rows - full).abs().max() <= tolerance * full.abs().max().clamp_min(1e-6))
    return chunked if same else model


def vocab_size_of(model: torch.nn.Module) -> int:
    """The logits' width, not ``len(tokenizer)``: padded vocabularies have extra rows."""
    return model.get_output_embeddings().weight.shape[0]


def build_scorer(forward: Callable, vocab_size: int, source_dir: str | Path, target_tokenizer, *, top_k: int,
                 temperature: float, max_length: int | None, vocab_map_dir: str | Path, device: torch.device | str,
                 chunk_rows: int = 512) -> SourceScorer:
    """The scorer of one source whose logits (``vocab_size`` wide) come from ``forward``.

    A Hugging Face model is scored through ``head_chunked``: no full-vocabulary logits for the batch.
    Another callable (the engine group's forward, whose LM head AutoTP may split) returns its logits
    in the model's dtype, which ``next_token_topk`` turns into fp32 ``chunk_rows`` positions at a time.

    Args:
        forward: the source model, or any callable with its signature (a DeepSpeed engine).
        source_dir: the source's Hugging Face folder (its tokenizer is read from there).
        target_tokenizer: the target's fast tokenizer (positions and ids of the answers).
        top_k, temperature: candidates per position and the temperature they are kept at.
        max_length: tokens per sequence (chunks fit it under every tokenizer); None: no truncation.
        vocab_map_dir: where vocabulary maps are cached (shared by ranks and reruns).
        device: where the source's inputs go.
    """
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    vocab_map = VocabMap.build(tokenizer, target_tokenizer, vocab_size, cache_dir=vocab_map_dir)
    if isinstance(forward, torch.nn.Module):
        forward = head_chunked(forward)
    return SourceScorer(forward, tokenizer, target_tokenizer, vocab_map, top_k=top_k, temperature=temperature,
                        dtype=torch.float32, max_length=max_length, chunk_rows=chunk_rows, device=device)
