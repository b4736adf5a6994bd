"""From corpus rows to target batches: chunking that fits every tokenizer, collation, sampling.

Every chunk must fit ``max_length`` tokens under the target's tokenizer AND under every source's
tokenizer, because each of them re-tokenises the same raw text (alignment works on characters).
``chunk_documents`` plans chunk ends from one batched, offset-carrying tokenisation of each
document per tokenizer, then checks every planned chunk exactly (one batched call per tokenizer
and round) and re-plans only the rare chunk that re-tokenised longer than planned.

Chunk boundaries: a document loses its leading and trailing whitespace (it carries no content and
would otherwise yield whitespace-only chunks); inside, the chunks of a document concatenate to
exactly its stripped text. A chunk ends just before the start of a word, so it keeps the
whitespace that follows its last word; blank lines are preferred over line breaks, line breaks
over spaces, as long as the chunk stays at least half as long as it may be. A word is cut only
when it alone (with the whitespace after it) does not fit.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
# Bump when chunk boundaries change, so chunked splits cached by build_chunked_split are redone.
CHUNKING_VERSION = 1
_REPORT_NAME = "chunk_report.json"
# Chunks planned per document before they are verified: bounds the work a failed chunk wastes.
_CHUNKS_PER_ROUND = 32
# Fewest content tokens a chunk must be allowed under every tokenizer: one code point takes up to
# 4 byte tokens plus a space marker, and a limit this tight makes chunks useless anyway.
MIN_CONTENT_TOKENS = 8
# Lookup table: is code point c whitespace (str.isspace)? The last one is U+3000, so every code
# point above maps to the final False entry.
_IS_SPACE = np.array([chr(c).isspace() for c in range(0x3001)] + [False])


@dataclass
class DataReport:
    """What chunking did with its input rows.

    Attributes:
        rows: rows seen.
        documents: rows kept (the others are counted in ``skipped``).
        chunks: chunks produced.
        characters: characters in the chunks.
        skipped: reason -> rows dropped: "none" (text is None), "nan" (a float NaN, as pandas
            writes missing text), "not_str" (any other non-str), "empty" (empty or whitespace
            only), "bad_unicode" (lone surrogates, which no tokenizer accepts), "bad_domain" (the row's
            domain is not a str).
        word_cuts: chunk ends inside a word (one word longer than the limit).
        replans: planned chunks that re-tokenised longer than the plan and were planned again.
    """

    rows: int = 0
    documents: int = 0
    chunks: int = 0
    characters: int = 0
    skipped: Counter = field(default_factory=Counter)
    word_cuts: int = 0
    replans: int = 0

    def merge(self, other: DataReport) -> DataReport:
        return DataReport(
            rows=self.rows + other.rows,
            documents=self.documents + other.documents,
            chunks=self.chunks + other.chunks,
            characters=self.characters + other.characters,
            skipped=self.skipped + other.skipped,
            word_cuts=self.word_cuts + other.word_cuts,
            replans=self.replans + other.replans,
        )

    @classmethod
    def from_dict(cls, values: Mapping) -> DataReport:
        return cls(**{**values, "skipped": Counter(values["skipped"])})

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "documents": self.documents,
            "chunks": self.chunks,
            "characters": self.characters,
            "skipped": dict(sorted(self.skipped.items())),
            "word_cuts": self.word_cuts,
            "replans": self.replans,
        }


def chunk_documents(
    texts: Sequence,
    domains: Sequence | None,
    tokenizers: Sequence[PreTrainedTokenizerBase],
    max_length: int,
) -> tuple[list[str], list[str], DataReport]:
    """Split documents into chunks of at most ``max_length`` tokens under every tokenizer.

    Token counts include the special tokens each tokenizer adds (BOS, CLS/SEP ...), i.e. they are
    ``len(tokenizer(chunk, split_special_tokens=True)["input_ids"])``: special-token strings in the
    text count as the text they are. Boundaries follow the module docstring.

    Args:
        texts: documents; rows that are None, NaN, not str, whitespace only, or hold lone
            surrogates are skipped and counted in the report (``DataReport.skipped``).
        domains: one label per text, or None for an unlabelled corpus (chunks get domain "").
        tokenizers: fast (Rust-backed) tokenizers, e.g. the target's and every source's.
        max_length: token limit per chunk.

    Returns:
        (chunk texts, chunk domains, report); chunks keep document order.

    Raises:
        ValueError: ``domains`` and ``texts`` differ in length; no tokenizer, or one that is not
            fast; ``max_length`` leaves a tokenizer fewer than MIN_CONTENT_TOKENS content tokens;
            a single character tokenises longer than ``max_length``.
    """
    # Plain lists: datasets Columns and similar lazy sequences are slow to index one by one.
    texts = list(texts)
    domains = None if domains is None else list(domains)
    if domains is not None and len(domains) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(domains)} domains; pass one domain per text, or domains=None")
    budgets = _content_budgets(tokenizers, max_length)
    report = DataReport(rows=len(texts))
    documents, document_domains = [], []
    for index, text in enumerate(texts):
        domain = "" if domains is None else domains[index]
        reason = _skip_reason(text, domain)
        if reason is not None:
            report.skipped[reason] += 1
            continue
        documents.append(text.strip())
        document_domains.append(domain)
    report.documents = len(documents)

    spans = _ChunkPlanner(documents, tokenizers, budgets, max_length, report).plan()
    chunks, chunk_domains = [], []
    for document, domain, document_spans in zip(documents, document_domains, spans):
        for start, end in document_spans:
            chunks.append(document[start:end])
            chunk_domains.append(domain)
    report.chunks = len(chunks)
    report.characters = sum(len(chunk) for chunk in chunks)
    return chunks, chunk_domains, report


def build_chunked_split(
    dataset_split: datasets.Dataset,
    tokenizers: Sequence[PreTrainedTokenizerBase],
    max_length: int,
    cache_dir: str | Path | None = None,
) -> tuple[datasets.Dataset, DataReport]:
    """Chunk one corpus split (columns ``text`` and, optionally, ``domain``) with ``chunk_documents``.

    Args:
        cache_dir: when given, the chunked split and its report are kept in a sub-folder named by
            a hash of the split's texts and domains, every tokenizer and ``max_length``, and are
            loaded from there the next time (chunking a few MB under five tokenizers takes a
            minute on two cores). Written to a temporary folder and renamed, so concurrent
            ranks never read a partial copy.

    Returns:
        (Dataset with str columns text and domain, one row per chunk; report).

    Raises:
        KeyError: the split has no ``text`` column.
        ValueError: see ``chunk_documents``.
    """
    if "text" not in dataset_split.column_names:
        raise KeyError(f"the split needs a 'text' column; it has {dataset_split.column_names}")
    domains = dataset_split["domain"] if "domain" in dataset_split.column_names else None
    cached = None if cache_dir is None else Path(cache_dir) / _chunking_key(dataset_split, tokenizers, max_length)
    if cached is not None and (cached / _REPORT_NAME).is_file():
        return datasets.load_from_disk(str(cached)), DataReport.from_dict(json.loads((cached / _REPORT_NAME).read_text()))
    chunks, chunk_domains, report = chunk_documents(dataset_split["text"], domains, tokenizers, max_length)
    features = datasets.Features({"text": datasets.Value("string"), "domain": datasets.Value("string")})
    chunked = datasets.Dataset.from_dict({"text": chunks, "domain": chunk_domains}, features=features)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # mkdtemp, not the pid: ranks may also be threads of one process.
        partial = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{cached.name}.partial-"))
        chunked.save_to_disk(str(partial))
        (partial / _REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=1))
        try:
            partial.rename(cached)
        except OSError:
            # Another rank saved the same chunks first.
            shutil.rmtree(partial, ignore_errors=True)
        chunked = datasets.load_from_disk(str(cached))
    return chunked, report


def _chunking_key(dataset_split: datasets.Dataset, tokenizers: Sequence[PreTrainedTokenizerBase], max_length: int) -> str:
    digest = hashlib.sha256(f"chunking v{CHUNKING_VERSION} max_length={max_length}".encode())
    for tokenizer in tokenizers:
        # The backend's JSON holds normaliser, model and post-processor; the special-token count
        # covers wrappers that add BOS outside it.
        digest.update(hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).digest())
        digest.update(len(tokenizer("a", verbose=False)["input_ids"]).to_bytes(8, "little"))
    columns = [name for name in ("text", "domain") if name in dataset_split.column_names]
    for batch in dataset_split.select_columns(columns).iter(batch_size=1024):
        for name in columns:
            for value in batch[name]:
                data = repr(value).encode("utf-8", errors="surrogatepass")
                digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:24]


class TextBatchCollator:
    """Rows ``{"text", "domain"}`` -> a right-padded target batch.

    Output of ``__call__`` for B rows, L = the longest row's token count (specials included):
        input_ids[B, L] long, attention_mask[B, L] long (1 = real token),
        labels[B, L] long (input_ids, -100 at padding), texts: list[str], domains: list[str],
        chunk_index: list[int | None] (the rows' ``chunk_index`` column, None where absent).

    Padding uses the tokenizer's pad token, else its EOS token; a real EOS inside a row keeps its
    label, because padding is located by the attention mask, not by token id.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int):
        """Raises ValueError: the tokenizer has neither a pad nor an EOS token, or max_length < 1."""
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token; set tokenizer.pad_token before building the collator")
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[Mapping]) -> dict:
        """Raises:
            ValueError: no rows, or a row tokenises longer than max_length.
            KeyError: a row lacks "text" or "domain".
        """
        if not rows:
            raise ValueError("cannot collate an empty batch")
        for row in rows:
            if "text" not in row or "domain" not in row:
                raise KeyError(f"every row needs 'text' and 'domain'; got keys {sorted(row)}")
        texts = [row["text"] for row in rows]
        ids = self.tokenizer(texts, add_special_tokens=True, split_special_tokens=True, verbose=False)["input_ids"]
        lengths = [len(row_ids) for row_ids in ids]
        for index, length in enumerate(lengths):
            if length > self.max_length:
                raise ValueError(
                    f"row {index} (domain {rows[index]['domain']!r}) has {length} tokens, more than max_length={self.max_length}; "
                    f"chunk the dataset with build_chunked_split(..., max_length={self.max_length}) including this tokenizer"
                )
        width = max(lengths)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row_ids in enumerate(ids):
            input_ids[index, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
            attention_mask[index, : len(row_ids)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX),
            "texts": texts,
            "domains": [row["domain"] for row in rows],
            # Row numbers in the chunked split, when it carries them: offline answers are joined on them.
            "chunk_index": [row.get("chunk_index") for row in rows],
        }


def make_dataloader(
    dataset: datasets.Dataset,
    collator: TextBatchCollator,
    batch_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = True,
) -> DataLoader:
    """A DataLoader over this data-parallel rank's share of ``dataset``.

    A ``DistributedSampler`` with explicit ``num_replicas=dp_size`` and ``rank=dp_rank`` (no
    process-group call) hands each rank a disjoint share; with ``drop_last`` the last
    ``len(dataset) % dp_size`` examples of each epoch's order are left out and incomplete
    batches are dropped, otherwise the sampler repeats examples to even out the shares. Iterate
    with ``iterate_epochs`` (or call ``loader.sampler.set_epoch(epoch)`` before each epoch) to get
    a new order every epoch that all ranks agree on.

    Raises:
        ValueError: ``dp_rank`` not in [0, dp_size), ``batch_size`` < 1, or no full batch per rank.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    sampler = DistributedSampler(dataset, num_replicas=dp_size, rank=dp_rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
    if drop_last and len(sampler) < batch_size:
        raise ValueError(
            f"{len(dataset)} examples over dp_size={dp_size} ranks give {len(sampler)} per rank, fewer than batch_size={batch_size}: "
            "no full batch; lower batch_size or use more data"
        )
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator, drop_last=drop_last)


def iterate_epochs(loader: DataLoader, start_epoch: int = 0, skip_batches: int = 0) -> Iterator[tuple[int, dict]]:
    """Yield ``(epoch, batch)`` without end, from ``start_epoch`` on.

    Sets the sampler's epoch before each pass, so each epoch is a new permutation that is the same
    on every rank and in every run. ``skip_batches`` drops the first batches of ``start_epoch``,
    to resume mid-epoch from a checkpoint.
    """
    for epoch in itertools.count(start_epoch):
        loader.sampler.set_epoch(epoch)
        batches = iter(loader)
        if epoch == start_epoch:
            batches = itertools.islice(batches, skip_batches, None)
        for batch in batches:
            yield epoch, batch


def _skip_reason(text, domain) -> str | None:
    if text is None:
        return "none"
    if isinstance(text, float) and math.isnan(text):
        return "nan"
    if not isinstance(text, str):
        return "not_str"
    if not text.strip():
        return "empty"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "bad_unicode"
    if not isinstance(domain, str):
        return "bad_domain"
    return None


def _content_budgets(tokenizers: Sequence[PreTrainedTokenizerBase], max_length: int) -> np.ndarray:
    """Tokens left for text under each tokenizer once its special tokens are placed."""
    if not tokenizers:
        raise ValueError("chunking needs at least one tokenizer")
    budgets = []
    for tokenizer in tokenizers:
        if not tokenizer.is_fast:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} is not a fast tokenizer; chunking needs its character offsets (load it with use_fast=True)")
        # Measured rather than asked for: some tokenizers add BOS in code, outside their post-processor.
        specials = len(tokenizer("a", verbose=False)["input_ids"]) - len(tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"])
        if max_length - specials < MIN_CONTENT_TOKENS:
            raise ValueError(
                f"max_length={max_length} leaves tokenizer {tokenizer.name_or_path!r} {max_length - specials} tokens after its {specials} special tokens; "
                f"use max_length >= {specials + MIN_CONTENT_TOKENS}"
            )
        budgets.append(max_length - specials)
    return np.array(budgets, dtype=np.int64)


class _ChunkPlanner:
    """Greedy chunk plans from token offsets, checked by exact re-tokenisation of every chunk."""

    def __init__(self, documents: list[str], tokenizers: Sequence[PreTrainedTokenizerBase], budgets: np.ndarray, max_length: int, report: DataReport):
        self.documents = documents
        self.tokenizers = tokenizers
        self.budgets = budgets
        self.max_length = max_length
        self.report = report
        # Per tokenizer and document: running maxima of token starts and ends. Running maxima keep
        # the arrays sorted where byte-level tokens of one character share or reorder offsets.
        self.starts, self.ends = [], []
        for tokenizer in tokenizers:
            encoded = tokenizer(documents, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                                split_special_tokens=True, verbose=False)
            offsets = [np.asarray(pairs, dtype=np.int64).reshape(-1, 2) for pairs in encoded["offset_mapping"]]
            self.starts.append([np.maximum.accumulate(pairs[:, 0]) if len(pairs) else pairs[:, 0] for pairs in offsets])
            self.ends.append([np.maximum.accumulate(pairs[:, 1]) if len(pairs) else pairs[:, 1] for pairs in offsets])
        self.candidates = [_word_starts(document) for document in documents]

    def plan(self) -> list[list[tuple[int, int]]]:
        """Chunk spans [start, end) per document, every one verified to fit every tokenizer.

        Each round plans up to _CHUNKS_PER_ROUND chunks per unfinished document and verifies them
        in one batched call per tokenizer. A chunk that does not fit is planned again, holding
        back as many tokens as it overflowed by; the chunks planned after it are dropped, so a
        failure costs at most one round's chunks of its document.
        """
        accepted = [[] for _ in self.documents]
        fresh = np.zeros(len(self.tokenizers), dtype=np.int64)
        # document -> (start of its first unverified chunk, tokens to hold back for that chunk)
        pending = {index: (0, fresh) for index in range(len(self.documents))}
        while pending:
            planned = {index: self._plan_from(index, start, held_back) for index, (start, held_back) in pending.items()}
            excess = self._excess([self.documents[index][start:end] for index, spans in planned.items() for start, end in spans])
            next_pending, offset = {}, 0
            for index, spans in planned.items():
                failed = np.flatnonzero(excess[offset : offset + len(spans)].any(axis=1))
                good = spans[: failed[0]] if len(failed) else spans
                accepted[index].extend(good)
                if len(failed):
                    start, end = spans[failed[0]]
                    self._check_shortest(index, start, end, excess[offset + failed[0]])
                    self.report.replans += 1
                    held_back = pending[index][1] if start == pending[index][0] else fresh
                    next_pending[index] = (start, held_back + excess[offset + failed[0]])
                elif good[-1][1] < len(self.documents[index]):
                    next_pending[index] = (good[-1][1], fresh)
                offset += len(spans)
            pending = next_pending
        for document, spans in zip(self.documents, accepted):
            self.report.word_cuts += sum(1 for _, end in spans[:-1] if not (document[end - 1].isspace() or document[end].isspace()))
        return accepted

    def _check_shortest(self, index: int, start: int, end: int, excess: np.ndarray) -> None:
        """Raise when a failed chunk is already the shortest the planner makes (one character)."""
        if not self.documents[index][start : end - 1].strip():
            raise ValueError(
                f"the character {self.documents[index][end - 1]!r} alone takes more than max_length={self.max_length} tokens "
                f"under tokenizer(s) {[self.tokenizers[k].name_or_path for k in np.flatnonzero(excess)]}; raise max_length"
            )

    def _plan_from(self, index: int, start: int, held_back: np.ndarray) -> list[tuple[int, int]]:
        spans = []
        while start < len(self.documents[index]) and len(spans) < _CHUNKS_PER_ROUND:
            end = self._chunk_end(index, start, self.budgets - held_back)
            spans.append((start, end))
            start, held_back = end, 0
        return spans

    def _chunk_end(self, index: int, start: int, budgets: np.ndarray) -> int:
        document = self.documents[index]
        limit = len(document)
        for k, budget in enumerate(budgets):
            if budget <= 0:
                limit = start
                break
            starts, ends = self.starts[k][index], self.ends[k][index]
            # The first token not wholly before `start`, then the first one the budget cannot hold.
            first = int(np.searchsorted(ends, start, side="right"))
            if first + budget < len(starts):
                limit = min(limit, int(starts[first + budget]))
        if limit >= len(document):
            return len(document)
        positions, levels = self.candidates[index]
        # A chunk may start inside whitespace (after a cut there); it must still reach a word.
        first_word = start if not document[start].isspace() else int(positions[np.searchsorted(positions, start, side="right")])
        low = int(np.searchsorted(positions, first_word, side="right"))
        high = max(int(np.searchsorted(positions, limit, side="right")), low)
        if high > low:
            window_positions, window_levels = positions[low:high], levels[low:high]
            half = start + (limit - start) / 2
            for level in (2, 1):
                preferred = np.flatnonzero((window_levels >= level) & (window_positions > half))
                if len(preferred):
                    return int(window_positions[preferred[-1]])
            return int(window_positions[-1])
        # No word start fits the plan: keep the whole word if it fits after all, else cut it.
        following = int(positions[high]) if high < len(positions) else len(document)
        if not self._excess([document[start:following]])[0].any():
            return following
        return max(limit, first_word + 1)

    def _excess(self, texts: list[str]) -> np.ndarray:
        """Tokens beyond max_length, [len(texts), num tokenizers] (0 where a text fits)."""
        excess = np.zeros((len(texts), len(self.tokenizers)), dtype=np.int64)
        if texts:
            for k, tokenizer in enumerate(self.tokenizers):
                ids = tokenizer(texts, add_special_tokens=True, return_attention_mask=False, split_special_tokens=True,
                                verbose=False)["input_ids"]
                excess[:, k] = np.maximum(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) - self.max_length, 0)
        return excess


def _word_starts(document: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions where a word follows whitespace, and the break there: 2 blank line, 1 line, 0 space.

    ``document`` must be stripped, so that whitespace runs and words alternate, word first.
    """
    codepoints = np.frombuffer(document.encode("utf-32-le"), dtype=np.uint32)
    space = _IS_SPACE[np.minimum(codepoints, len(_IS_SPACE) - 1)]
    changes = np.flatnonzero(space[1:] != space[:-1]) + 1
    run_starts, word_starts = changes[0::2], changes[1::2]
    newlines = np.concatenate([[0], np.cumsum(codepoints == ord("\n"))])
    return word_starts.astype(np.int64), np.minimum(newlines[word_starts] - newlines[run_starts], 2)


def load_chunked_split(
    corpus_dir: str,
    split_name: str,
    domains: Sequence[str] | None,
    tokenizers: Sequence[PreTrainedTokenizerBase],
    max_length: int,
    cache_dir: str | None = None,
) -> tuple[datasets.Dataset, DataReport]:
    """One split of a ``save_to_disk`` corpus, restricted to ``domains``, chunked for every tokenizer.

    The trainer and the offline precompute both read their chunks through here, so row i means
    the same chunk to both.

    Raises:
        KeyError: the corpus has no split ``split_name``, or lacks some of ``domains``.
    """
    corpus = datasets.load_from_disk(corpus_dir)
    if split_name not in corpus:
        raise KeyError(f"split {split_name!r} is not in {corpus_dir} (it has {list(corpus)})")
    split = corpus[split_name]
    if domains is not None:
        present = set(split.unique("domain"))
        missing = sorted(set(domains) - present)
        if missing:
            raise KeyError(f"domains {missing} are not in {corpus_dir}/{split_name} (it has {sorted(present)})")
        wanted = set(domains)
        split = split.filter(lambda row: row["domain"] in wanted)
    return build_chunked_split(split, tokenizers, max_length, cache_dir=cache_dir)
