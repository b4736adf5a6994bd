"""Score texts with one source model: sparse top-k next-token answers at TARGET positions.

The scorer is placement-agnostic: ``model`` is any callable taking ``input_ids`` and
``attention_mask`` and returning logits ``[B, L, V]`` (a tensor, or an object with
``.logits`` such as a Hugging Face CausalLM output or a DeepSpeed inference engine's), or
``HiddenStates`` (the final hidden states and the LM head, so that only chunks of positions
ever have logits).
The vocabulary size V is read from the logits, never from ``len(tokenizer)``: padded
vocabularies make them differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from fusion.alignment import ALIGNED, INSIDE, LabelPlan, TokenSpelling, plan_labels, token_boundaries
from fusion.sources.answer import SparseSoftLabels
from fusion.vocab_map import MidTextTokenizer, SurfaceIndex, VocabMap, shifted_surface, spell_vocabulary

Offsets = Sequence[tuple[int, int]]


@dataclass
class HiddenStates:
    """A source forward's final hidden states and the head that makes logits of some of their rows.

    What a model callable may return instead of full logits (``fusion.sources.loading.HeadChunkedForward``):
    ``next_token_topk`` then computes the logits of at most ``chunk_rows`` positions at a time, so no
    ``[B, L, V]`` tensor exists (a 262k-vocabulary source's logits are 1 MiB per position in fp32).
    """

    hidden: torch.Tensor  # [B, L, H]
    head: Callable[[torch.Tensor], torch.Tensor]  # [n, H] -> [n, V] logits
    vocab_size: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.hidden.shape[:2], self.vocab_size)

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def at(self, row: int, position: int) -> torch.Tensor:
        """``[V]`` logits of one position."""
        return self.head(self.hidden[row, position].unsqueeze(0))[0]


def encode_with_offsets(
    tokenizer, texts: Sequence[str], max_length: int | None = None
) -> tuple[list[list[int]], list[list[tuple[int, int]]], list[list[int]]]:
    """Token ids, character offsets and special-token masks of ``texts`` (special tokens added).

    This is the one encoding used for both sides of the alignment, so the target positions of a
    stored answer are those of ``encode_with_offsets(target_tokenizer, texts, max_length)``. Corpus
    text is text: strings such as ``<s>`` or ``<|endoftext|>`` inside it are tokenized as the
    characters they are (``split_special_tokens``), never as control tokens; only the special
    tokens the tokenizer adds around the text (BOS, CLS/SEP ...) are special.

    Raises:
        ValueError: the tokenizer is not a fast tokenizer (it has no character offsets).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer and gives no character offsets; "
            "load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    encoding = tokenizer(
        list(texts),
        add_special_tokens=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        split_special_tokens=True,
        truncation=max_length is not None,
        max_length=max_length,
    )
    offsets = [[tuple(pair) for pair in row] for row in encoding["offset_mapping"]]
    return encoding["input_ids"], offsets, encoding["special_tokens_mask"]


def next_token_topk(
    logits: torch.Tensor | HiddenStates,
    attention_mask: torch.Tensor,
    next_ids: torch.Tensor,
    top_k: int,
    temperature: float = 1.0,
    chunk_rows: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k next-token log-probs and the gold token's log-prob at every real position.

    The full-vocabulary log-softmax is taken in float32 over at most ``chunk_rows`` (sequence,
    position) rows at a time, so the extra memory is ``chunk_rows × V × 4`` bytes whatever the
    batch size. Given ``HiddenStates``, the logits of those rows are made there too (through the
    head, in the model's dtype), so the forward pass holds no full-vocabulary tensor at all.

    Args:
        logits: ``[B, L, V]`` source logits (any float dtype), or the ``HiddenStates`` they come from.
        attention_mask: ``[B, L]``; 0 marks padding, whose outputs are left at their fill values.
        next_ids: ``[B, L]`` int64 id of the gold token following each position, -100 where
            none is scored.
        top_k: candidates kept per position.
        temperature: logits are divided by it before the candidates' log-softmax (not for gold).
        chunk_rows: rows whose full-vocabulary log-softmax is held at once.

    Returns:
        ``(logprobs [B, L, k] float32, ids [B, L, k] int64, gold_logprob [B, L] float32)``; padding
        gets ``-inf``/0 and positions without a gold token get a gold log-prob of 0.

    Raises:
        ValueError: ``top_k`` exceeds the vocabulary, or ``temperature``/``chunk_rows`` is not positive.
    """
    batch, length, vocab = logits.shape
    if not 0 < top_k <= vocab:
        raise ValueError(f"top_k={top_k} must lie in [1, {vocab}] (the logits' vocabulary width)")
    if temperature <= 0 or chunk_rows <= 0:
        raise ValueError(f"temperature={temperature} and chunk_rows={chunk_rows} must both be positive")
    # Rows of logits, or of hidden states that the head turns into logits one chunk at a time.
    head = logits.head if isinstance(logits, HiddenStates) else None
    flat = logits.reshape(batch * length, vocab) if head is None else logits.hidden.reshape(batch * length, -1)
    device = flat.device
    flat_next = next_ids.reshape(-1).to(device)
    rows = attention_mask.reshape(-1).to(device).nonzero().squeeze(1)
    top_logprobs = torch.full((batch * length, top_k), float("-inf"), dtype=torch.float32, device=device)
    top_ids = torch.zeros(batch * length, top_k, dtype=torch.long, device=device)
    gold_logprob = torch.zeros(batch * length, dtype=torch.float32, device=device)
    for start in range(0, rows.numel(), chunk_rows):
        chunk = rows[start : start + chunk_rows]
        x = (flat[chunk] if head is None else head(flat[chunk])).float()
        log_normaliser = torch.logsumexp(x, dim=-1)
        values, ids = x.topk(top_k, dim=-1)
        if temperature == 1.0:
            top_logprobs[chunk] = values - log_normaliser[:, None]
        else:
            top_logprobs[chunk] = values / temperature - torch.logsumexp(x / temperature, dim=-1, keepdim=True)
        top_ids[chunk] = ids
        gold = flat_next[chunk]
        has_gold = gold >= 0
        gold_logit = x.gather(1, gold.clamp(min=0)[:, None]).squeeze(1)
        gold_logprob[chunk] = torch.where(has_gold, gold_logit - log_normaliser, 0.0)
    return (
        top_logprobs.view(batch, length, top_k),
        top_ids.view(batch, length, top_k),
        gold_logprob.view(batch, length),
    )


def _scored_bytes(text: str, offsets: Offsets, special: Sequence[int], scored: np.ndarray) -> int:
    """UTF-8 bytes of the text covered by the scored tokens.

    A tokenizer without BOS never predicts its first token, and truncation drops the tail;
    counting only the covered span keeps nats per byte comparable across tokenizers. The span
    starts at the end of the token before the first scored one (so a leading space trimmed from
    a token's offsets is still counted), or at 0 when that token is special (BOS).
    """
    positions = np.flatnonzero(scored)
    if positions.size == 0:
        return 0
    first, last = positions[0], positions[-1]
    before = [p for p in range(first) if not special[p]]
    start = offsets[before[-1]][1] if before else 0
    return len(text[start : offsets[last][1]].encode("utf-8"))


def _logits_of(output) -> torch.Tensor | HiddenStates:
    if isinstance(output, HiddenStates):
        return output
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(
            f"the source model returned {type(output).__name__}; expected logits [B, L, V] as a tensor, "
            "as the .logits attribute of its output, or HiddenStates"
        )
    return logits


class SourceScorer:
    """One source model's sparse answers, aligned to a target tokenizer's positions and vocabulary.

    Args:
        model: callable ``model(input_ids=[B, L] int64, attention_mask=[B, L] int64)`` returning
            logits ``[B, L, V]`` (directly or as ``.logits``) or ``HiddenStates``.
        source_tokenizer: the source's fast tokenizer.
        target_tokenizer: the target's fast tokenizer (used when ``score`` gets no target offsets).
        vocab_map: source→target vocabulary map built for V source ids (the logits' width).
        top_k: candidates kept per position.
        temperature: source logits are divided by it before the candidates' log-softmax; 1.0 keeps
            the model's own distribution (the ``SparseSoftLabels`` convention). NLLs always use 1.0.
        dtype: dtype of the returned logprobs.
        max_length: tokens per sequence (both tokenizers truncate to it); None: no truncation.
        chunk_rows: (sequence, position) rows whose full-vocabulary log-softmax is held at once.
        device: where input ids are placed; default the device of the model's first parameter
            (CPU when the model has none).
    """

    def __init__(
        self,
        model: Callable,
        source_tokenizer,
        target_tokenizer,
        vocab_map: VocabMap,
        top_k: int = 10,
        temperature: float = 1.0,
        dtype: torch.dtype = torch.float16,
        max_length: int | None = None,
        chunk_rows: int = 512,
        device: torch.device | str | None = None,
    ) -> None:
        if top_k <= 0 or temperature <= 0:
            raise ValueError(f"SourceScorer: top_k={top_k} and temperature={temperature} must both be positive")
        self.model = model
        self.source_tokenizer = source_tokenizer
        self.target_tokenizer = target_tokenizer
        self.vocab_map = vocab_map
        self.top_k = top_k
        self.temperature = temperature
        self.dtype = dtype
        self.max_length = max_length
        self.chunk_rows = chunk_rows
        if device is None and isinstance(model, torch.nn.Module):
            device = next(model.parameters(), torch.empty(0)).device
        self.device = torch.device(device or "cpu")
        pad_id = getattr(source_tokenizer, "pad_token_id", None)
        # Any id works for padding (it is masked and right-aligned); 0 when the tokenizer has none.
        self.pad_id = 0 if pad_id is None else pad_id

    def score(
        self, texts: Sequence[str], target_offsets: Sequence[Offsets] | None = None, length: int | None = None
    ) -> SparseSoftLabels:
        """Sparse answers of the source for ``texts`` at target positions, in one forward pass.

        Args:
            texts: B texts.
            target_offsets: per text, the target tokenizer's character offsets of its (unpadded)
                encoding including special tokens; default ``encode_with_offsets(target_tokenizer,
                texts, max_length)``. Target position t of row i is token t of that encoding
                (right padding).
            length: position dimension L of the answer (≥ every target length); default the longest.

        Returns:
            ``SparseSoftLabels`` on CPU with ``[B, L, k]`` candidates. A position is valid when its
            ``plans`` entry is aligned (``_fill_aligned``) or inside a source token (``_fill_inside``)
            and at least one candidate maps into the target vocabulary; NLLs count every non-special
            source token the model predicts (not BOS).

        Raises:
            ValueError: sizes disagree (offsets vs texts, length, the vocab map vs the logits' width),
                a text encodes to no tokens, or the model returns no ``[B, L, V]`` logits.
        """
        target_ids, own_offsets, _ = encode_with_offsets(self.target_tokenizer, texts, self.max_length)
        target_offsets = own_offsets if target_offsets is None else target_offsets
        if len(target_offsets) != len(texts):
            raise ValueError(f"score: got {len(target_offsets)} target offset lists for {len(texts)} texts")
        for row, (given, own) in enumerate(zip(target_offsets, own_offsets)):
            if [tuple(span) for span in given] != own:
                raise ValueError(
                    f"score: the target offsets of text {row} are not those of encode_with_offsets(target_tokenizer, "
                    f"texts, max_length={self.max_length}); pass that encoding's offsets or none"
                )
        longest = max((len(o) for o in target_offsets), default=0)
        length = longest if length is None else length
        if longest > length:
            raise ValueError(f"score: a target sequence has {longest} tokens, more than length={length}")

        ids, source_offsets, special = encode_with_offsets(self.source_tokenizer, texts, self.max_length)
        plans = self._plans(texts, (ids, source_offsets), (target_ids, own_offsets))
        input_ids, attention_mask, next_ids = self._batch_tensors(ids, special)
        with torch.inference_mode():
            logits = _logits_of(self.model(input_ids=input_ids, attention_mask=attention_mask))
            if logits.shape[:2] != input_ids.shape:
                raise ValueError(f"score: the model returned logits {tuple(logits.shape)} for input ids {tuple(input_ids.shape)}")
            if logits.shape[-1] != len(self.vocab_map.source_to_target):
                raise ValueError(
                    f"score: the model's logits have {logits.shape[-1]} vocabulary entries but the vocab map covers "
                    f"{len(self.vocab_map.source_to_target)}; build it with source_vocab_size={logits.shape[-1]}"
                )
            top_logprobs, top_ids, gold_logprob = next_token_topk(
                logits, attention_mask, next_ids, self.top_k, self.temperature, self.chunk_rows
            )
            inside = self._inside_candidates(logits, texts, plans)
            del logits
        top_logprobs, top_ids, gold_logprob = top_logprobs.cpu(), top_ids.cpu(), gold_logprob.cpu()

        answer = SparseSoftLabels.empty(len(texts), length, self.top_k, self.dtype)
        self._fill_aligned(answer, plans, ids, target_ids, top_logprobs, top_ids)
        _fill_inside(answer, texts, plans, ids, target_ids, inside, *self._spellings()[:3])
        scored = (next_ids >= 0).cpu()
        for row, text in enumerate(texts):
            count = int(scored[row].sum())
            nats = -float(gold_logprob[row].double().sum())
            # scored[j] marks the prediction of token j+1, so the covered tokens are shifted by one.
            covered = np.concatenate([[False], scored[row, : len(ids[row]) - 1].numpy()])
            n_bytes = _scored_bytes(text, source_offsets[row], special[row], covered)
            answer.nll_per_token[row] = nats / count if count else math.nan
            answer.nll_per_byte[row] = nats / n_bytes if n_bytes else math.nan
        return answer

    def _batch_tensors(
        self, ids: list[list[int]], special: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ``input_ids``/``attention_mask`` and the scored next ids (-100: not scored)."""
        width = max((len(row) for row in ids), default=0)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(ids), width, dtype=torch.long)
        next_ids = torch.full((len(ids), width), -100, dtype=torch.long)
        for row, (row_ids, row_special) in enumerate(zip(ids, special)):
            n = len(row_ids)
            if n == 0:
                raise ValueError(f"score: text {row} encodes to no source tokens; drop empty chunks before scoring")
            input_ids[row, :n] = torch.tensor(row_ids, dtype=torch.long)
            attention_mask[row, :n] = 1
            following = torch.tensor(row_ids[1:], dtype=torch.long)
            # Predicting a special token (EOS, a separator) says nothing about the text.
            is_text = ~torch.tensor(row_special[1:], dtype=torch.bool)
            next_ids[row, : n - 1] = torch.where(is_text, following, -100)
        return input_ids.to(self.device), attention_mask.to(self.device), next_ids.to(self.device)

    def plans(self, texts: Sequence[str]) -> list[LabelPlan]:
        """Per text, which source distribution labels each target position (``fusion.alignment.LabelPlan``),
        for the encodings ``score`` uses."""
        source = encode_with_offsets(self.source_tokenizer, texts, self.max_length)
        target = encode_with_offsets(self.target_tokenizer, texts, self.max_length)
        return self._plans(texts, source[:2], target[:2])

    def _plans(self, texts, source, target) -> list[LabelPlan]:
        source_spelling = TokenSpelling.of(self.source_tokenizer)
        target_spelling = TokenSpelling.of(self.target_tokenizer)
        plans = []
        for row, text in enumerate(texts):
            source_bounds = token_boundaries(source[0][row], source[1][row], text, source_spelling)
            target_bounds = token_boundaries(target[0][row], target[1][row], text, target_spelling)
            plans.append(plan_labels(source_bounds, target_bounds, text, source[0][row], source_spelling))
        return plans

    def _spellings(self):
        """Source/target surfaces, the target's mid-text tokenizer and the source's surface index,
        computed once per scorer."""
        if getattr(self, "_spelled", None) is None:
            source = spell_vocabulary(self.source_tokenizer, len(self.vocab_map.source_to_target))
            target = spell_vocabulary(self.target_tokenizer)
            self._spelled = (source.surfaces, target.surfaces, MidTextTokenizer(self.target_tokenizer, target),
                             SurfaceIndex(source.surfaces))
        return self._spelled

    def _fill_aligned(self, answer: SparseSoftLabels, plans: list[LabelPlan], source_ids, target_ids,
                      top_logprobs: torch.Tensor, top_ids: torch.Tensor) -> None:
        """Fill ``answer`` (in place) at the aligned target positions: the top-k of the source position
        predicting the token that starts where the target's next token starts, mapped at the alignment's
        space shift.

        Where the source's own next token spells less of the text than the target's next token (the
        source splits digits where the target keeps "201"), a candidate whose text is a proper prefix of
        the target's next token maps to that token: the text says that is what the target emits for the
        continuation the candidate begins (the same rule holds inside source tokens, ``_fill_inside``).
        """
        source_surfaces, target_surfaces = self._spellings()[:2]
        for row, plan in enumerate(plans):
            hit = np.flatnonzero(plan.kind == ALIGNED)
            if not hit.size:
                continue
            positions = plan.source[hit]
            mapped, dropped = self.vocab_map.map_topk(top_ids[row, positions].numpy(), plan.space_shift[hit])
            for slot, (t, j) in enumerate(zip(hit.tolist(), positions.tolist())):
                gold = target_surfaces[target_ids[row][t + 1]]
                shift = int(plan.space_shift[t])
                ids_row = mapped[slot].astype(np.int64)
                actual = shifted_surface(source_surfaces[source_ids[row][j + 1]], shift)
                if _spells_less(actual, gold):
                    for c, candidate in enumerate(top_ids[row, j].tolist()):
                        if _spells_less(shifted_surface(source_surfaces[candidate], shift), gold):
                            ids_row[c], dropped[slot, c] = target_ids[row][t + 1], False
                _write_label(answer, row, t, ids_row, dropped[slot], top_logprobs[row, j])

    def _inside_candidates(self, logits: torch.Tensor | HiddenStates, texts, plans: list[LabelPlan]) -> dict:
        """``{(row, t): (logprobs [k], ids [k])}`` at the inside positions of ``plans``: ``extending_topk``
        of the source position ``plan.source[t]`` over the ids extending the characters seen."""
        index = self._spellings()[3]
        queries, keys = [], []
        for row, (text, plan) in enumerate(zip(texts, plans)):
            for t in np.flatnonzero(plan.kind == INSIDE).tolist():
                seen = text[plan.seen_from[t]:plan.next_start[t]].encode("utf-8", "surrogatepass")
                queries.append((row, int(plan.source[t]), *index.extending(seen)))
                keys.append((row, t))
        logprobs, ids = extending_topk(logits, queries, index, self.top_k, self.temperature)
        return {key: (logprobs[q], ids[q]) for q, key in enumerate(keys)}


def extending_topk(logits: torch.Tensor | HiddenStates, queries: Sequence[tuple[int, int, int, int]], index: SurfaceIndex,
                   top_k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The source's distribution over the ids that extend what the target has seen, renormalised, top-k.

    For query ``(row, position, lo, hi)`` the candidates are ``index.order[lo:hi]`` (every id whose
    surface extends the characters seen, from the whole vocabulary); their log-probs are the
    log-softmax of ``logits[row, position] / temperature`` over those ids alone, and the ``top_k`` most
    probable are returned (fewer candidates: the rest of the row is ``-inf`` with id 0). Only the
    candidates' logits are read, one position at a time: no full-vocabulary copy.

    Args:
        logits: ``[B, L, V]`` source logits, or the ``HiddenStates`` they come from (then the logits of
            each queried position alone are made).
        queries: ``(row, position, lo, hi)`` per inside target position.
        index: the source's ``SurfaceIndex``.
        top_k: candidates kept per query.
        temperature: as in ``next_token_topk``.

    Returns:
        ``(logprobs [Q, k] float32, ids [Q, k] int64)`` on CPU.
    """
    logprobs = torch.full((len(queries), top_k), float("-inf"), dtype=torch.float32, device=logits.device)
    ids = torch.zeros(len(queries), top_k, dtype=torch.long, device=logits.device)
    if queries:
        order = index.device_order(logits.device)
        for q, (row, position, lo, hi) in enumerate(queries):
            if hi <= lo:
                continue
            candidates = order[lo:hi]
            at = logits.at(row, position) if isinstance(logits, HiddenStates) else logits[row, position]
            x = at[candidates].float() / temperature
            values, slots = x.topk(min(top_k, hi - lo))
            logprobs[q, : len(slots)] = values - torch.logsumexp(x, dim=0)
            ids[q, : len(slots)] = candidates[slots]
    return logprobs.cpu(), ids.cpu()


def _fill_inside(answer: SparseSoftLabels, texts, plans: list[LabelPlan], source_ids, target_ids, inside: dict,
                 source_surfaces, target_surfaces, mid_text: MidTextTokenizer) -> None:
    """Fill ``answer`` (in place) at the target positions whose next token starts inside a source token.

    The target's next token starts at ``c`` inside source token ``m``, whose first characters
    ``seen = text[start_m:c]`` the target has already consumed (``fusion.alignment.plan_labels``). The
    source's distribution at ``m - 1`` over the ids of its whole vocabulary that spell ``seen`` and
    more, renormalised over them (``extending_topk``), is its belief about what follows ``text[:c]``;
    each of the top-k maps to the target token that starts the target's tokenization of its
    remainder (the text after ``seen``), or, when the source's own token ``m`` spells less than the
    target's next token past ``seen``, to that target token if the remainder is a proper prefix of
    it (``SourceScorer._fill_aligned``). A remainder that is a piece of a character is dropped.
    """
    pending = []  # (row, t, bytes seen, [(slot, remainder)])
    for (row, t), (_, ids) in inside.items():
        seen = len(texts[row][plans[row].seen_from[t]:plans[row].next_start[t]].encode("utf-8", "surrogatepass"))
        pending.append((row, t, seen, [(slot, source_surfaces[candidate][seen:])
                                       for slot, candidate in enumerate(ids.tolist()) if source_surfaces[candidate]]))
    first = iter(mid_text.first_tokens([r.decode("utf-8", errors="ignore") for *_, slots in pending
                                        for _, r in slots]).tolist())
    for row, t, seen, slots in pending:
        logprobs = inside[row, t][0]
        gold_id = target_ids[row][t + 1]
        gold = target_surfaces[gold_id]
        resolve = _spells_less(source_surfaces[source_ids[row][plans[row].source[t] + 1]][seen:], gold)
        mapped = np.zeros(len(logprobs), dtype=np.int64)
        dropped = np.ones(len(logprobs), dtype=bool)
        for slot, remainder in slots:
            projected = next(first)
            if resolve and _spells_less(remainder, gold):
                projected = gold_id
            elif remainder.decode("utf-8", errors="ignore").encode() != remainder:
                projected = -1  # a piece of a character: no text to project
            if projected >= 0 and torch.isfinite(logprobs[slot]):
                mapped[slot], dropped[slot] = projected, False
        if not dropped.all():
            _write_label(answer, row, t, mapped, dropped, logprobs)


def _write_label(answer: SparseSoftLabels, row: int, t: int, mapped: np.ndarray, dropped: np.ndarray,
                 logprobs: torch.Tensor) -> None:
    """Position ``t`` of ``answer``'s row: the mapped candidates, their log-probs, dropped ones cleared."""
    dropped_t = torch.as_tensor(np.asarray(dropped), dtype=torch.bool)
    answer.indices[row, t] = torch.as_tensor(np.asarray(mapped), dtype=torch.int32).masked_fill(dropped_t, 0)
    answer.logprobs[row, t] = logprobs.masked_fill(dropped_t, float("-inf")).to(answer.logprobs.dtype)
    answer.valid[row, t] = not bool(dropped_t.all())


def _spells_less(surface: bytes | None, gold: bytes | None) -> bool:
    """Whether ``surface`` is a non-empty proper prefix of ``gold``."""
    return bool(surface) and bool(gold) and len(surface) < len(gold) and gold.startswith(surface)
