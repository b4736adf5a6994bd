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

Long and pathological rows: the offset-carrying tokenisation that plans the cuts runs over
windows of at most ``window_chars(max_length)`` characters, cut at word starts (the plan is
checked exactly anyway); a run of more characters than that without a word start (one huge
"word": a base64 blob, CJK text without spaces) is cut at the window's end, and its row counted
in ``DataReport.capped_rows``. A word is re-tokenised alone (to see whether it fits after all)
only when the plan's tokens say it might. Together these keep chunking linear in the length of a
row, whatever the script.

Corpora (``load_chunked_split``): JSON Lines / JSON, Parquet, CSV and plain-text files, a folder
of them, or a ``datasets`` ``save_to_disk`` Dataset or DatasetDict. The text comes from one field
(``data.text_field``), the domain label from another (``data.domain_field``; by default
``domain`` when the corpus has it, else every row is in the domain ``all``). A corpus without an
eval split gets one carved out of its rows: see ``held_out_rows``.
"""
from __future__ import annotations

import csv
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
from typing import TYPE_CHECKING

import datasets
import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, DistributedSampler

from fusion.config import ConfigError

if TYPE_CHECKING:  # annotations only: importing transformers costs seconds, and config checks import this module
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
# Bump when chunk boundaries change, so chunked splits cached by build_chunked_split are redone.
# 2: documents planned in windows (window_chars), "all" as the domain of unlabelled rows.
# 3: special-token strings in the text are tokenized as text (split_special_tokens) on every side.
CHUNKING_VERSION = 3
_REPORT_NAME = "chunk_report.json"
# Chunks planned per document before they are verified: bounds the work a failed chunk wastes.
_CHUNKS_PER_ROUND = 32
# Fewest content tokens a chunk must be allowed under every tokenizer: one code point takes up to
# 4 byte tokens plus a space marker, and a limit this tight makes chunks useless anyway.
MIN_CONTENT_TOKENS = 8
# Lookup table: is code point c whitespace (str.isspace)? The last one is U+3000, so every code
# point above maps to the final False entry.
_IS_SPACE = np.array([chr(c).isspace() for c in range(0x3001)] + [False])
# Tokenisation window of the plan, in characters per token of max_length, and at least
# _MIN_WINDOW_CHARS: far more characters than one chunk ever holds, so windows hardly move cuts.
_WINDOW_CHARS_PER_TOKEN = 64
_MIN_WINDOW_CHARS = 1 << 16
# Characters planned together (documents) and tokenised in one batched call (windows): bounds memory.
_GROUP_CHARS = 1 << 21
# A word is re-tokenised on its own to see whether it fits only when the document's tokenisation
# gives it at most this many times the budget (plus MIN_CONTENT_TOKENS): re-tokenising a huge
# word for every chunk cut out of it made chunking quadratic.
_WORD_RECHECK_FACTOR = 2
# Domain of every row of a corpus without domain labels.
UNLABELLED_DOMAIN = "all"


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
            domain is not a str, or not valid Unicode).
        word_cuts: chunk ends inside a word (one word longer than the limit).
        replans: planned chunks that re-tokenised longer than the plan and were planned again.
        capped_rows: rows holding a run of more than ``window_chars(max_length)`` characters
            without whitespace, cut at the window's end before planning (see the module docstring).
    """

    rows: int = 0
    documents: int = 0
    chunks: int = 0
    characters: int = 0
    skipped: Counter = field(default_factory=Counter)
    word_cuts: int = 0
    replans: int = 0
    capped_rows: int = 0

    def merge(self, other: DataReport) -> DataReport:
        return DataReport(
            rows=self.rows + other.rows,
            documents=self.documents + other.documents,
            chunks=self.chunks + other.chunks,
            characters=self.characters + other.characters,
            skipped=self.skipped + other.skipped,
            word_cuts=self.word_cuts + other.word_cuts,
            replans=self.replans + other.replans,
            capped_rows=self.capped_rows + other.capped_rows,
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
            "capped_rows": self.capped_rows,
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
        domains: one label per text, or None for an unlabelled corpus (chunks get domain
            UNLABELLED_DOMAIN, ``all``).
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
        domain = UNLABELLED_DOMAIN if domains is None else domains[index]
        reason = _skip_reason(text, domain)
        if reason is not None:
            report.skipped[reason] += 1
            continue
        documents.append(text.strip())
        document_domains.append(domain)
    report.documents = len(documents)

    spans = []
    for low, high in _batches([len(document) for document in documents], _GROUP_CHARS):
        spans += _ChunkPlanner(documents[low:high], tokenizers, budgets, max_length, report).plan()
    chunks, chunk_domains = [], []
    for document, domain, document_spans in zip(documents, document_domains, spans):
        report.word_cuts += sum(1 for _, end in document_spans[:-1] if not (document[end - 1].isspace() or document[end].isspace()))
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
        cache_dir: see ``chunk_rows``.

    Returns:
        (Dataset with str columns text and domain, one row per chunk; report).

    Raises:
        KeyError: the split has no ``text`` column.
        ValueError: see ``chunk_documents``.
    """
    if "text" not in dataset_split.column_names:
        raise KeyError(f"the split needs a 'text' column; it has {dataset_split.column_names}")
    domains = dataset_split["domain"] if "domain" in dataset_split.column_names else None
    return chunk_rows(dataset_split["text"], domains, tokenizers, max_length, cache_dir)


def chunk_rows(
    texts: Sequence,
    domains: Sequence | None,
    tokenizers: Sequence[PreTrainedTokenizerBase],
    max_length: int,
    cache_dir: str | Path | None = None,
) -> tuple[datasets.Dataset, DataReport]:
    """``chunk_documents`` of rows, as a Dataset (str columns text and domain, one row per chunk).

    Args:
        cache_dir: when given, the chunked split and its report are kept in a sub-folder named by
            a hash of CHUNKING_VERSION, the texts and domains, every tokenizer and ``max_length``,
            and are loaded from there the next time (chunking a few MB under five tokenizers
            takes a minute on two cores). Written to a temporary folder and renamed, so
            concurrent ranks never read a partial copy.

    Raises:
        ValueError: see ``chunk_documents``.
    """
    texts = list(texts)
    domains = [UNLABELLED_DOMAIN] * len(texts) if domains is None else list(domains)
    cached = None if cache_dir is None else Path(cache_dir) / _chunking_key(texts, domains, tokenizers, max_length)
    if cached is not None and (cached / _REPORT_NAME).is_file():
        return datasets.load_from_disk(str(cached)), DataReport.from_dict(json.loads((cached / _REPORT_NAME).read_text()))
    chunks, chunk_domains, report = chunk_documents(texts, domains, tokenizers, max_length)
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


def _chunking_key(texts: Sequence, domains: Sequence, tokenizers: Sequence[PreTrainedTokenizerBase], max_length: int) -> str:
    digest = hashlib.sha256(f"chunking v{CHUNKING_VERSION} max_length={max_length}".encode())
    for tokenizer in tokenizers:
        # The backend's JSON holds normaliser, model and post-processor; the special-token count
        # covers wrappers that add BOS outside it.
        digest.update(hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).digest())
        digest.update(len(tokenizer("a", verbose=False)["input_ids"]).to_bytes(8, "little"))
    for text, domain in zip(texts, domains):
        for value in (text, domain):
            data = _row_bytes(value)
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:24]


def _row_bytes(value) -> bytes:
    """A row value as bytes for hashing: lone surrogates and non-str values included, distinctly."""
    return repr(value).encode("utf-8", errors="surrogatepass")


@dataclass(frozen=True)
class Segments:
    """The documents of a batch: each is encoded alone (with its own special tokens, e.g. its BOS) and
    placed at ``starts[i]`` in batch row ``rows[i]``, so position ``starts[i] + t`` of that row is
    token t of ``encode_with_offsets(target_tokenizer, [texts[i]])``. N documents, in row order.

    Attributes:
        texts: N document texts (chunks).
        rows: N batch rows.
        starts: N first positions in their row.
        lengths: N target tokens (special tokens included).
        chunk_index: N rows in the chunked split (offline answers are joined on them), None where unknown.
    """

    texts: list[str]
    rows: list[int]
    starts: list[int]
    lengths: list[int]
    chunk_index: list[int | None]

    def of_rows(self, rows: Sequence[int]) -> list[int]:
        """The documents of batch rows ``rows``, in document order."""
        wanted = set(rows)
        return [index for index, row in enumerate(self.rows) if row in wanted]


class TextBatchCollator:
    """Rows -> a right-padded target batch. A row is one document (``{"text", "domain"}``, a chunk) or a
    packed row of several (``{"texts": [...], "domain"}``, see ``fusion.packing``), optionally with
    ``chunk_index`` (an int, or a list for packed rows).

    Every document is encoded alone (its own special tokens) and the row is their concatenation, so the
    separation between documents is what every tokenizer does at the start of a text.

    Output of ``__call__`` for B rows, L = the longest row's token count (specials included):
        input_ids[B, L] long, attention_mask[B, L] long (1 = real token),
        position_ids[B, L] long: 0, 1, ... from the start of each document (and of the padding, which
            so forms a block of its own): the model keeps attention within documents from them,
        labels[B, L] long: input_ids, -100 at padding and at the first position of every document, so
            the last token of a document is never trained to predict the next document's first token,
        segments: ``Segments``, domains: list[str].

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
            ValueError: no rows, a packed row without documents, or a row tokenises longer than max_length.
            KeyError: a row lacks "text"/"texts" or "domain".
        """
        if not rows:
            raise ValueError("cannot collate an empty batch")
        documents = [_row_documents(row) for row in rows]
        texts = [text for row_texts, _ in documents for text in row_texts]
        ids = self.tokenizer(texts, add_special_tokens=True, split_special_tokens=True, verbose=False)["input_ids"]
        segment_rows = [row for row, (row_texts, _) in enumerate(documents) for _ in row_texts]
        lengths = [len(document_ids) for document_ids in ids]
        row_lengths = np.bincount(segment_rows, weights=lengths, minlength=len(rows)).astype(np.int64)
        for index, length in enumerate(row_lengths.tolist()):
            if length > self.max_length:
                raise ValueError(
                    f"row {index} (domain {rows[index]['domain']!r}) has {length} tokens, more than max_length={self.max_length}; "
                    f"chunk the dataset with build_chunked_split(..., max_length={self.max_length}) including this tokenizer"
                    " (and pack it with fusion.packing.pack_chunks)"
                )
        width = int(row_lengths.max())
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        starts, ends = [], np.zeros(len(rows), dtype=np.int64)
        for row, document_ids in zip(segment_rows, ids):
            start, end = int(ends[row]), int(ends[row]) + len(document_ids)
            starts.append(start)
            input_ids[row, start:end] = torch.tensor(document_ids, dtype=torch.long)
            position_ids[row, start:end] = torch.arange(end - start)
            labels[row, start + 1:end] = input_ids[row, start + 1:end]
            ends[row] = end
        for row, end in enumerate(ends.tolist()):
            position_ids[row, end:] = torch.arange(width - end)
        attention_mask = (torch.arange(width)[None, :] < torch.as_tensor(ends)[:, None]).long()
        chunk_index = [index for _, row_index in documents for index in row_index]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "labels": labels,
            "segments": Segments(texts, segment_rows, starts, lengths, chunk_index),
            "domains": [row["domain"] for row in rows],
        }


def _row_documents(row: Mapping) -> tuple[list[str], list[int | None]]:
    """(documents, their chunk indices) of one collator row."""
    if "domain" not in row or ("text" not in row and "texts" not in row):
        raise KeyError(f"every row needs 'text' (or 'texts') and 'domain'; got keys {sorted(row)}")
    packed = "texts" in row
    texts = list(row["texts"]) if packed else [row["text"]]
    if not texts:
        raise ValueError("a packed row holds no documents")
    index = row.get("chunk_index")
    chunk_index = [None] * len(texts) if index is None else (list(index) if packed else [index])
    return texts, chunk_index


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
    if not _is_unicode(text):
        return "bad_unicode"
    if not isinstance(domain, str) or not _is_unicode(domain):
        return "bad_domain"
    return None


def _is_unicode(text: str) -> bool:
    """False for a str holding lone surrogates (as json.loads and surrogateescape decoding make):
    no tokenizer and no Arrow column accepts them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
        self.candidates = [_word_starts(document) for document in documents]
        # Per document and tokenizer: tokens every chunk holds back (see plan).
        self.slack = np.zeros((len(documents), len(tokenizers)), dtype=np.int64)
        cap = window_chars(max_length)
        windows = []  # (document, start, end)
        for index, document in enumerate(documents):
            spans, capped = _windows(document, self.candidates[index][0], cap)
            report.capped_rows += capped
            windows += [(index, start, end) for start, end in spans]
        # Per tokenizer and document: running maxima of token starts and ends. Running maxima keep
        # the arrays sorted where byte-level tokens of one character share or reorder offsets.
        self.starts, self.ends = [], []
        for tokenizer in tokenizers:
            pieces = [[] for _ in documents]
            for low, high in _batches([end - start for _, start, end in windows], _GROUP_CHARS):
                batch = windows[low:high]
                encoded = tokenizer([documents[index][start:end] for index, start, end in batch], add_special_tokens=False,
                                    return_offsets_mapping=True, return_attention_mask=False, split_special_tokens=True,
                                    verbose=False)
                for (index, start, _), pairs in zip(batch, encoded["offset_mapping"]):
                    pieces[index].append(np.asarray(pairs, dtype=np.int64).reshape(-1, 2) + start)
            offsets = [np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64) for parts in pieces]
            self.starts.append([np.maximum.accumulate(pairs[:, 0]) if len(pairs) else pairs[:, 0] for pairs in offsets])
            self.ends.append([np.maximum.accumulate(pairs[:, 1]) if len(pairs) else pairs[:, 1] for pairs in offsets])

    def plan(self) -> list[list[tuple[int, int]]]:
        """Chunk spans [start, end) per document, every one verified to fit every tokenizer.

        Each round plans up to _CHUNKS_PER_ROUND chunks per unfinished document and verifies them
        in one batched call per tokenizer. A chunk that does not fit is planned again, holding
        back as many tokens as it overflowed by; the chunks planned after it are dropped, so a
        failure costs at most one round's chunks of its document. The document's later chunks
        hold back that many tokens too (at most 1/32 of the budget): where chunks re-tokenise
        longer alone than inside the document (a SentencePiece word marker at a cut inside a
        word), every other chunk would fail otherwise.
        """
        accepted = [[] for _ in self.documents]
        fresh = np.zeros(len(self.tokenizers), dtype=np.int64)
        most_slack = np.maximum(1, self.budgets // 32)
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
                    overflow = excess[offset + failed[0]]
                    slack = np.maximum(self.slack[index], np.minimum(overflow, most_slack))
                    # This chunk holds back the overflow once: in the slack, the rest in held_back.
                    next_pending[index] = (start, held_back + overflow - (slack - self.slack[index]))
                    self.slack[index] = slack
                elif good[-1][1] < len(self.documents[index]):
                    next_pending[index] = (good[-1][1], fresh)
                offset += len(spans)
            pending = next_pending
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
            end = self._chunk_end(index, start, self.budgets - self.slack[index] - held_back)
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
        if self._may_fit(index, start, following) and not self._excess([document[start:following]])[0].any():
            return following
        return max(limit, first_word + 1)

    def _may_fit(self, index: int, start: int, end: int) -> bool:
        """Whether ``document[start:end]`` is worth re-tokenising alone to see if it fits: the plan's
        tokens over it are at most _WORD_RECHECK_FACTOR budgets (+ MIN_CONTENT_TOKENS) under every
        tokenizer. This bounds the text re-tokenised per chunk by the chunk's own size."""
        for k, budget in enumerate(self.budgets):
            tokens = int(np.searchsorted(self.starts[k][index], end, side="left")) - int(np.searchsorted(self.ends[k][index], start, side="right"))
            if tokens > _WORD_RECHECK_FACTOR * budget + MIN_CONTENT_TOKENS:
                return False
        return True

    def _excess(self, texts: list[str]) -> np.ndarray:
        """Tokens beyond max_length, [len(texts), num tokenizers] (0 where a text fits)."""
        return np.maximum(token_counts(texts, self.tokenizers) - self.max_length, 0)


def token_counts(texts: Sequence[str], tokenizers: Sequence[PreTrainedTokenizerBase]) -> np.ndarray:
    """``[len(texts), len(tokenizers)]`` int64: the tokens of each text encoded alone under each tokenizer,
    the special tokens it adds included and special-token strings in the text counted as text.

    The count every chunk is held to (``max_length``) and the one packing adds up (``fusion.packing``):
    each document of a packed row is encoded alone, exactly so.
    """
    counts = np.zeros((len(texts), len(tokenizers)), dtype=np.int64)
    if len(texts):
        for k, tokenizer in enumerate(tokenizers):
            ids = tokenizer(list(texts), add_special_tokens=True, return_attention_mask=False, split_special_tokens=True,
                            verbose=False)["input_ids"]
            counts[:, k] = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return counts


def window_chars(max_length: int) -> int:
    """Characters per tokenisation window of the chunk plan (see the module docstring)."""
    return max(_MIN_WINDOW_CHARS, _WINDOW_CHARS_PER_TOKEN * max_length)


def _windows(document: str, word_starts: np.ndarray, cap: int) -> tuple[list[tuple[int, int]], bool]:
    """Spans of at most ``cap`` characters that concatenate to ``document``, each ending at its last
    word start, or at ``cap`` where none lies after its start (a run of more than ``cap``
    characters without a word start).

    Returns:
        (spans, whether some span was cut at ``cap``).
    """
    spans, start, capped = [], 0, False
    while len(document) - start > cap:
        high = int(np.searchsorted(word_starts, start + cap, side="right"))
        if high and word_starts[high - 1] > start:
            end = int(word_starts[high - 1])
        else:
            end, capped = start + cap, True
        spans.append((start, end))
        start = end
    spans.append((start, len(document)))
    return spans, capped


def _batches(sizes: Sequence[int], limit: int) -> Iterator[tuple[int, int]]:
    """Consecutive index ranges [low, high) of ``sizes`` summing to at most ``limit`` (or one item)."""
    low, total = 0, 0
    for index, size in enumerate(sizes):
        if index > low and total + size > limit:
            yield low, index
            low, total = index, 0
        total += size
    if low < len(sizes):
        yield low, len(sizes)


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


# ---------------------------------------------------------------------------------------------
# Corpora: files or save_to_disk folders -> the rows (text, domain) of one split.

# File suffix -> format of a corpus file.
CORPUS_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
# Fraction of each domain's distinct texts carved out as the eval split of a corpus that has none.
HELD_OUT_FRACTION = 0.05
# Salt of the carve's hash: part of what decides which rows are held out (see held_out_rows).
_HELD_OUT_SALT = b"fusion held-out v1"
_FORMATS_HINT = "use .jsonl/.json, .parquet, .csv or .txt files, a folder of them, or a datasets save_to_disk folder"

# One split of an opened corpus: a Dataset (save_to_disk), or (format, files).
_Source = datasets.Dataset | tuple[str, list[Path]]


def load_chunked_split(
    corpus_dir: str,
    split_name: str,
    domains: Sequence[str] | None,
    tokenizers: Sequence[PreTrainedTokenizerBase],
    max_length: int,
    cache_dir: str | None = None,
    *,
    text_field: str = "text",
    domain_field: str | None = None,
    train_split: str = "train",
    eval_split: str = "validation",
) -> tuple[datasets.Dataset, DataReport]:
    """One split of a corpus (any format of the module docstring), restricted to ``domains``,
    chunked for every tokenizer (``chunk_rows``).

    The trainer and the offline precompute both read their chunks through here, so row i means
    the same chunk to both. A corpus without splits, or whose only split is ``train_split``, has
    its ``eval_split`` carved out of its rows (``held_out_rows``) and ``train_split`` is the rest.
    ``corpus_layout(config.data)`` gives the keyword arguments of a run config.

    Args:
        corpus_dir: the corpus path (``data.corpus``): a file or a folder.
        text_field, domain_field: see ``read_split``.

    Raises:
        KeyError: the corpus has no split ``split_name``, or lacks some of ``domains``.
        ConfigError: the corpus cannot be read, lacks a field, or gives no chunk (the message
            names the ``data.*`` key and the fix).
        ValueError: see ``chunk_documents``.
    """
    texts, labels = read_split(corpus_dir, split_name, text_field=text_field, domain_field=domain_field,
                               train_split=train_split, eval_split=eval_split)
    if domains is not None:
        present = {label for label in labels if isinstance(label, str)}
        missing = sorted(set(domains) - present)
        if missing:
            raise KeyError(f"domains {missing} are not in {corpus_dir}/{split_name} (it has {sorted(present)})")
        wanted = set(domains)
        rows = [index for index, label in enumerate(labels) if label in wanted]
        texts, labels = [texts[index] for index in rows], [labels[index] for index in rows]
    chunked, report = chunk_rows(texts, labels, tokenizers, max_length, cache_dir)
    if not len(chunked):
        raise ConfigError(
            f"data.corpus: split {split_name!r} of {corpus_dir!r} gives no text: {report.rows} rows, "
            f"skipped {dict(sorted(report.skipped.items()))} (field {text_field!r}); check data.text_field and data.domains"
        )
    return chunked, report


def corpus_layout(data) -> dict:
    """The keyword arguments of ``load_chunked_split`` / ``read_split`` set by a run config's
    ``data`` section (``fusion.config.DataConfig``)."""
    return {"text_field": data.text_field, "domain_field": data.domain_field, "train_split": data.train_split,
            "eval_split": data.eval_split}


def read_split(
    corpus_dir: str,
    split_name: str,
    *,
    text_field: str = "text",
    domain_field: str | None = None,
    train_split: str = "train",
    eval_split: str = "validation",
) -> tuple[list, list]:
    """The rows of one split of a corpus: (texts, domain labels), unfiltered.

    Args:
        text_field: the column / JSON key holding the text (plain-text files: one text per file,
            so only the default ``text``).
        domain_field: the column holding the domain label; None: ``domain`` when the corpus has
            it, else every row gets UNLABELLED_DOMAIN (``all``). Integer labels (and a
            ClassLabel's names) become str.

    Texts are returned as read, None or invalid ones included (``chunk_documents`` skips and
    counts them); files are decoded as UTF-8 with invalid bytes kept as lone surrogates, which
    chunking counts as ``bad_unicode``.

    Raises:
        KeyError: no split ``split_name``.
        ConfigError: see ``check_corpus``; a JSON/CSV row that does not parse; too few rows to
            carve out ``eval_split``.
    """
    opened = _open_corpus(corpus_dir)
    carved = list(opened) in ([None], [train_split])
    if carved and split_name not in (train_split, eval_split):
        raise KeyError(
            f"split {split_name!r} is not in {corpus_dir}: it has {'no splits' if None in opened else f'only {train_split!r}'}, "
            f"so only data.train_split ({train_split!r}) and data.eval_split ({eval_split!r}, carved out of it) exist"
        )
    if not carved and split_name not in opened:
        hint = (f"; name one of them, or keep only {train_split!r} in the corpus to have {split_name!r} carved out of it"
                if split_name == eval_split else "")
        raise KeyError(f"split {split_name!r} is not in {corpus_dir} (it has {sorted(opened)}){hint}")
    source = next(iter(opened.values())) if carved else opened[split_name]
    text_field, domain_field = _resolve_fields(corpus_dir, [source], text_field, domain_field)
    texts, labels = _read_source(source, text_field, domain_field)
    if carved:
        held = held_out_rows(texts, labels)
        if split_name == eval_split and not held:
            raise ConfigError(
                f"data.eval_split: {corpus_dir!r} has no split {eval_split!r} and too few rows to carve one out "
                "(a domain needs 2 distinct usable texts); add rows, or give the corpus an eval split"
            )
        rows = held if split_name == eval_split else sorted(set(range(len(texts))) - set(held))
        texts, labels = [texts[index] for index in rows], [labels[index] for index in rows]
    return texts, labels


def held_out_rows(texts: Sequence, domains: Sequence) -> list[int]:
    """Rows carved out as the eval split of a corpus that has none, in row order.

    Per domain, the usable rows (those ``chunk_documents`` keeps) whose text has the smallest
    SHA-256 digest (salted with _HELD_OUT_SALT): ``round(HELD_OUT_FRACTION * n)`` of the domain's
    n distinct texts, at least 1 when n >= 2, none when n < 2. The choice depends only on the
    texts and labels: not on row order, the run's seed, the rank or the machine; copies of one
    text are held out together, so no text is in both splits.
    """
    by_domain: dict[bytes, dict[bytes, list[int]]] = {}
    for index, (text, domain) in enumerate(zip(texts, domains)):
        if _skip_reason(text, domain) is None:
            digest = hashlib.sha256(_HELD_OUT_SALT + _row_bytes(text)).digest()
            by_domain.setdefault(_row_bytes(domain), {}).setdefault(digest, []).append(index)
    held = []
    for copies in by_domain.values():
        count = max(1, round(HELD_OUT_FRACTION * len(copies))) if len(copies) >= 2 else 0
        for digest in sorted(copies)[:count]:
            held += copies[digest]
    return sorted(held)


def check_corpus(corpus_dir: str, text_field: str = "text", domain_field: str | None = None) -> None:
    """Check, without reading every row, that the corpus opens and has the fields in every split.

    For ``fusion.config.validate``: it runs before any model loads. Reads each file's first row,
    header or schema.

    Raises:
        ConfigError: the path does not exist, is an unsupported format, a folder without corpus
            files or mixing formats, a damaged save_to_disk folder, or a split or file lacks
            ``text_field`` / ``domain_field``; the message names the key and the fix.
    """
    _resolve_fields(corpus_dir, list(_open_corpus(corpus_dir).values()), text_field, domain_field)


def _open_corpus(corpus_dir: str) -> dict[str | None, _Source]:
    """The splits of a corpus by name, or ``{None: all rows}`` for a corpus without splits."""
    path = Path(corpus_dir)
    if not path.exists():
        raise ConfigError(f"data.corpus: {corpus_dir!r} does not exist; {_FORMATS_HINT} (`make assets` builds the demo corpus)")
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as error:  # any damage; the library's reason, in one line
            raise ConfigError(f"data.corpus: {corpus_dir!r} is not a readable save_to_disk folder ({_first_line(error)}); save it again") from None
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {None: loaded}
    if path.is_file():
        files = [path]
    else:
        files = sorted(file for file in path.rglob("*") if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts))
        if not files:
            raise ConfigError(f"data.corpus: folder {corpus_dir!r} holds no files; {_FORMATS_HINT}")
    unsupported = [str(file) for file in files if file.suffix.lower() not in CORPUS_FORMATS]
    if unsupported:
        more = f" (and {len(unsupported) - 1} more)" if len(unsupported) > 1 else ""
        raise ConfigError(f"data.corpus: {unsupported[0]!r}{more} is not a corpus file; {_FORMATS_HINT}")
    formats = sorted({CORPUS_FORMATS[file.suffix.lower()] for file in files})
    if len(formats) > 1:
        raise ConfigError(f"data.corpus: folder {corpus_dir!r} mixes {' and '.join(formats)} files; keep one format per corpus")
    return {None: (formats[0], files)}


def _resolve_fields(corpus_dir: str, sources: list, text_field: str, domain_field: str | None) -> tuple[str, str | None]:
    """(text field, domain field or None) after checking them in every split / file of ``sources``."""
    units = []  # (where, columns)
    for source in sources:
        if isinstance(source, datasets.Dataset):
            units.append((corpus_dir, source.column_names))
        else:
            kind, files = source
            if kind == "text":
                if text_field != "text" or domain_field is not None:
                    key = "data.text_field" if text_field != "text" else "data.domain_field"
                    raise ConfigError(f"{key}: plain-text corpora ({corpus_dir!r}) hold one text per file and no fields; remove {key}")
                return "text", None
            units += [(str(file), _file_columns(kind, file)) for file in files]
    for where, columns in units:
        if text_field not in columns:
            raise ConfigError(f"data.text_field: {where!r} has no field {text_field!r} (it has {sorted(columns)}); set data.text_field to the one holding the text")
        if domain_field is not None and domain_field not in columns:
            raise ConfigError(f"data.domain_field: {where!r} has no field {domain_field!r} (it has {sorted(columns)}); set data.domain_field to the one holding the domain label, or remove it")
    if domain_field is None:
        labelled = [where for where, columns in units if "domain" in columns]
        if labelled and len(labelled) < len(units):
            unlabelled = next(where for where, columns in units if "domain" not in columns)
            raise ConfigError(f"data.domain_field: {labelled[0]!r} has a 'domain' field but {unlabelled!r} has none; "
                              "give every file one, or set data.domain_field to a field they all have")
        domain_field = "domain" if labelled else None
    return text_field, domain_field


def _file_columns(kind: str, file: Path) -> list[str]:
    """The fields of a corpus file: its first JSON row's keys, CSV header or Parquet schema."""
    if kind == "parquet":
        try:
            return pq.read_schema(file).names
        except Exception as error:  # not Parquet, truncated ...
            raise ConfigError(f"data.corpus: {str(file)!r} is not a readable Parquet file ({_first_line(error)}); write it again") from None
    if kind == "csv":
        with file.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
            header = next(csv.reader(handle), None)
    else:
        rows = _json_rows(file)
        first = next(rows, None)
        rows.close()
        header = None if first is None else list(first[1])
    if header is None:
        raise ConfigError(f"data.corpus: {str(file)!r} holds no rows; remove it or fill it")
    return header


def _read_source(source: _Source, text_field: str, domain_field: str | None) -> tuple[list, list]:
    """All (texts, domain labels) of one split."""
    if isinstance(source, datasets.Dataset):
        columns = source.select_columns([text_field] + ([domain_field] if domain_field else [])).to_dict()
        texts = columns[text_field]
        if domain_field is None:
            return texts, [UNLABELLED_DOMAIN] * len(texts)
        labels = columns[domain_field]
        feature = source.features[domain_field]
        if isinstance(feature, datasets.ClassLabel):
            labels = [None if label is None else feature.int2str(label) for label in labels]
        return texts, _checked_labels(labels, domain_field)
    kind, files = source
    texts, labels = [], []
    for file in files:
        if kind == "text":
            texts.append(file.read_bytes().decode("utf-8-sig", errors="surrogateescape"))
        elif kind == "parquet":
            table = pq.read_table(file, columns=[text_field] + ([domain_field] if domain_field else []))
            texts += table.column(text_field).to_pylist()
            labels += table.column(domain_field).to_pylist() if domain_field else []
        else:
            for _, row in _json_rows(file) if kind == "json" else _csv_rows(file):
                texts.append(row.get(text_field))
                if domain_field:
                    labels.append(row.get(domain_field))
    if domain_field is None:
        return texts, [UNLABELLED_DOMAIN] * len(texts)
    return texts, _checked_labels(labels, domain_field)


def _checked_labels(labels: list, domain_field: str) -> list:
    """Integer labels as str; refuses the aggregate's name ``all`` beside other labels."""
    labels = [str(label) if isinstance(label, int) and not isinstance(label, bool) else label for label in labels]
    names = {label for label in labels if isinstance(label, str)}
    if UNLABELLED_DOMAIN in names and len(names) > 1:
        raise ConfigError(f"data.domain_field: the domain label {UNLABELLED_DOMAIN!r} (field {domain_field!r}) is reserved for "
                          "the total over all domains in evaluation; rename it in the corpus")
    return labels


def _json_rows(file: Path) -> Iterator[tuple[int, dict]]:
    """(line or item number, row) of a JSON Lines file, or of a ``.json`` file holding a list of rows."""
    with file.open(encoding="utf-8-sig", errors="surrogateescape") as handle:
        whole = file.suffix.lower() == ".json" and handle.read(4096).lstrip()[:1] == "["
        handle.seek(0)
        if whole:
            try:
                numbered = enumerate(json.load(handle), 1)
            except json.JSONDecodeError as error:
                raise ConfigError(f"data.corpus: {str(file)!r} line {error.lineno}: not valid JSON ({error.msg}); fix the file") from None
        else:
            numbered = _json_lines(file, handle)
        for number, row in numbered:
            if not isinstance(row, dict):
                raise ConfigError(f"data.corpus: {str(file)!r} row {number} is a {type(row).__name__}, not an object of fields; "
                                  "write one JSON object per row, e.g. {\"text\": \"...\"}")
            yield number, row


def _json_lines(file: Path, handle) -> Iterator[tuple[int, object]]:
    for number, line in enumerate(handle, 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"data.corpus: {str(file)!r} line {number}: not valid JSON ({error.msg}); fix or remove that line") from None


def _csv_rows(file: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a CSV file with a header line."""
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # the default (131,072 characters) refuses long documents
    try:
        with file.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
            reader = csv.DictReader(handle)
            try:
                for row in reader:
                    yield reader.line_num, row
            except csv.Error as error:
                raise ConfigError(f"data.corpus: {str(file)!r} line {reader.line_num}: not valid CSV ({error}); fix the file") from None
    finally:
        csv.field_size_limit(limit)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__
