"""The sparse answer of one source for a batch, and its Arrow form for offline storage.

In memory an answer is a :class:`SparseSoftLabels` (a dataclass of tensors, batch-first).
On disk it is one Arrow row per sequence (see :func:`answer_features`):

=================  ==========================================  =====================
column             Arrow type                                  bytes per token
=================  ==========================================  =====================
``chunk_index``    int64 (row of the chunked corpus split)     per row only
``indices``        list<fixed_size_list<int32>[k]>  (L × k)    4·k
``logprobs``       list<fixed_size_list<halffloat>[k]> (L × k) 2·k
``valid``          list<bool>  (L, bit-packed)                 1/8
``nll_per_token``  float32                                     per row only
``nll_per_byte``   float32                                     per row only
=================  ==========================================  =====================

So a stored token costs 6·k + 1/8 bytes plus 12 bytes of list offsets per row (60.1 bytes
for k = 10, under the 8·k budget). Log-probs are stored as IEEE float16 rather than as the
raw bits of bfloat16: both take 2 bytes, but stored log-probs lie in about [-100, 0] where
float16 has 3 more mantissa bits (absolute error ≤ 0.03 at -100, ≤ 0.004 at -10), ``-inf``
is representable, and Arrow and numpy read it natively (no bit reinterpretation on load).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import datasets
import numpy as np
import pyarrow as pa
import torch

STORED_LOGPROB_DTYPE = np.float16


@dataclass
class SparseSoftLabels:
    """Top-k next-token log-probs of one source, aligned to target positions and target ids.

    Attributes:
        indices: ``[B, L, k]`` int32 target-vocabulary ids; 0 where a candidate was dropped.
        logprobs: ``[B, L, k]`` float (fp32/fp16/bf16): the source's full-vocabulary log-prob of
            the candidate; ``-inf`` where it was dropped.
        valid: ``[B, L]`` bool: position t holds the source's distribution over target token t+1.
        nll_per_token: ``[B]`` float32 mean negative log-likelihood of the text per source token
            (NaN when not measured).
        nll_per_byte: ``[B]`` float32 total nats over the UTF-8 bytes they cover (NaN when not
            measured); comparable across tokenizers.

    Raises:
        ValueError: (on construction) shapes or dtypes disagree.
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    valid: torch.Tensor
    nll_per_token: torch.Tensor
    nll_per_byte: torch.Tensor

    def __post_init__(self) -> None:
        if self.indices.dim() != 3 or self.logprobs.shape != self.indices.shape:
            raise ValueError(
                f"SparseSoftLabels: indices {tuple(self.indices.shape)} and logprobs "
                f"{tuple(self.logprobs.shape)} must both be [B, L, k]"
            )
        if self.indices.dtype != torch.int32 or self.valid.dtype != torch.bool or not self.logprobs.is_floating_point():
            raise ValueError(
                f"SparseSoftLabels: expected int32 indices, floating logprobs and bool valid, got "
                f"{self.indices.dtype}, {self.logprobs.dtype}, {self.valid.dtype}"
            )
        batch, length, _ = self.indices.shape
        if self.valid.shape != (batch, length):
            raise ValueError(f"SparseSoftLabels: valid has shape {tuple(self.valid.shape)}, expected {(batch, length)}")
        for name in ("nll_per_token", "nll_per_byte"):
            if getattr(self, name).shape != (batch,):
                raise ValueError(f"SparseSoftLabels: {name} has shape {tuple(getattr(self, name).shape)}, expected {(batch,)}")

    @property
    def batch_size(self) -> int:
        return self.indices.shape[0]

    @property
    def length(self) -> int:
        return self.indices.shape[1]

    @property
    def top_k(self) -> int:
        return self.indices.shape[2]

    @classmethod
    def empty(
        cls,
        batch_size: int,
        length: int,
        top_k: int,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> "SparseSoftLabels":
        """An answer with no valid position (a source that was not asked); NLLs are NaN."""
        return cls(
            indices=torch.zeros(batch_size, length, top_k, dtype=torch.int32, device=device),
            logprobs=torch.full((batch_size, length, top_k), float("-inf"), dtype=dtype, device=device),
            valid=torch.zeros(batch_size, length, dtype=torch.bool, device=device),
            nll_per_token=torch.full((batch_size,), float("nan"), dtype=torch.float32, device=device),
            nll_per_byte=torch.full((batch_size,), float("nan"), dtype=torch.float32, device=device),
        )

    def to(self, device: torch.device | str) -> "SparseSoftLabels":
        return SparseSoftLabels(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, rows: torch.Tensor | Sequence[int]) -> "SparseSoftLabels":
        """The answer restricted to batch rows ``rows`` (indices or a ``[B]`` bool mask)."""
        if not isinstance(rows, torch.Tensor):
            rows = torch.as_tensor(rows, dtype=torch.long)
        rows = rows.to(self.indices.device)
        return SparseSoftLabels(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def pad_to(self, length: int) -> "SparseSoftLabels":
        """The answer with the position dimension extended to ``length`` by invalid positions.

        Raises:
            ValueError: ``length`` is shorter than the answer (positions would be lost).
        """
        if length < self.length:
            raise ValueError(f"pad_to: cannot shorten an answer of length {self.length} to {length}")
        if length == self.length:
            return self
        extra = SparseSoftLabels.empty(self.batch_size, length - self.length, self.top_k, self.logprobs.dtype, self.indices.device)
        return SparseSoftLabels(
            indices=torch.cat([self.indices, extra.indices], dim=1),
            logprobs=torch.cat([self.logprobs, extra.logprobs], dim=1),
            valid=torch.cat([self.valid, extra.valid], dim=1),
            nll_per_token=self.nll_per_token,
            nll_per_byte=self.nll_per_byte,
        )

    @staticmethod
    def concat(parts: Sequence["SparseSoftLabels"], length: int | None = None) -> "SparseSoftLabels":
        """Stack answers along the batch; shorter ones are padded with invalid positions.

        Args:
            parts: answers with the same k and logprob dtype.
            length: position dimension of the result (default: the longest part).

        Raises:
            ValueError: no parts, differing k or dtype, or a part longer than ``length``.
        """
        if not parts:
            raise ValueError("SparseSoftLabels.concat: got no answers to concatenate")
        if len({(p.top_k, p.logprobs.dtype) for p in parts}) != 1:
            raise ValueError(
                "SparseSoftLabels.concat: answers differ in top_k or logprob dtype: "
                f"{[(p.top_k, p.logprobs.dtype) for p in parts]}"
            )
        length = max(p.length for p in parts) if length is None else length
        padded = [p.pad_to(length) for p in parts]
        return SparseSoftLabels(**{f.name: torch.cat([getattr(p, f.name) for p in padded]) for f in fields(SparseSoftLabels)})


def answer_features(top_k: int) -> datasets.Features:
    """The ``datasets`` features (and so the Arrow schema) of stored answers with ``top_k`` candidates."""
    return datasets.Features(
        {
            "chunk_index": datasets.Value("int64"),
            "indices": datasets.List(datasets.List(datasets.Value("int32"), length=top_k)),
            "logprobs": datasets.List(datasets.List(datasets.Value("float16"), length=top_k)),
            "valid": datasets.List(datasets.Value("bool")),
            "nll_per_token": datasets.Value("float32"),
            "nll_per_byte": datasets.Value("float32"),
        }
    )


def _nested_list(values: np.ndarray, offsets: np.ndarray, top_k: int) -> pa.Array:
    inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), top_k)
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), inner)


def to_arrow(answer: SparseSoftLabels, chunk_index: Sequence[int], lengths: Sequence[int]) -> pa.Table:
    """One Arrow row per sequence holding its first ``lengths[i]`` positions.

    Args:
        answer: a ``[B, L, k]`` answer (any device).
        chunk_index: ``B`` row numbers of the sequences in the chunked corpus split.
        lengths: ``B`` target sequence lengths (the unpadded part of each row), each ≤ L.

    Returns:
        A table with the schema of :func:`answer_features` (``answer.top_k``).

    Raises:
        ValueError: ``chunk_index`` or ``lengths`` do not have B entries, or a length exceeds L.
    """
    answer = answer.to("cpu")
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(chunk_index) != answer.batch_size or lengths.shape != (answer.batch_size,):
        raise ValueError(
            f"to_arrow: got {len(chunk_index)} chunk indices and {lengths.shape[0]} lengths for a batch of {answer.batch_size}"
        )
    if lengths.size and (lengths.min() < 0 or lengths.max() > answer.length):
        raise ValueError(f"to_arrow: lengths {lengths.tolist()} must lie in [0, {answer.length}]")
    keep = torch.arange(answer.length)[None, :] < torch.as_tensor(lengths)[:, None]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    top_k = answer.top_k
    columns = {
        "chunk_index": pa.array(np.asarray(chunk_index, dtype=np.int64)),
        "indices": _nested_list(answer.indices[keep].numpy(), offsets, top_k),
        "logprobs": _nested_list(answer.logprobs[keep].float().numpy().astype(STORED_LOGPROB_DTYPE), offsets, top_k),
        "valid": pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), pa.array(answer.valid[keep].numpy())),
        "nll_per_token": pa.array(answer.nll_per_token.float().numpy()),
        "nll_per_byte": pa.array(answer.nll_per_byte.float().numpy()),
    }
    return pa.Table.from_pydict(columns, schema=answer_features(top_k).arrow_schema)


def from_arrow(table: pa.Table, length: int | None = None, dtype: torch.dtype = torch.float16) -> SparseSoftLabels:
    """The answer stored in ``table`` (rows of :func:`to_arrow`), right-padded to ``length``.

    Args:
        table: rows with the columns of :func:`answer_features` (e.g. ``dataset.with_format("arrow")[rows]``).
        length: position dimension of the result (default: the longest row).
        dtype: dtype of the returned logprobs.

    Raises:
        ValueError: a row is longer than ``length``.
    """
    table = table.combine_chunks()
    valid_col = table.column("valid").chunk(0) if table.num_rows else pa.array([], type=pa.list_(pa.bool_()))
    lengths = np.diff(valid_col.offsets.to_numpy())
    longest = int(lengths.max()) if lengths.size else 0
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"from_arrow: a stored row has {longest} positions, more than the requested length {length}")
    top_k = table.schema.field("indices").type.value_type.list_size
    answer = SparseSoftLabels.empty(table.num_rows, length, top_k, dtype)
    keep = torch.arange(length)[None, :] < torch.as_tensor(lengths)[:, None]
    if table.num_rows:
        for name, target in (("indices", answer.indices), ("logprobs", answer.logprobs)):
            values = table.column(name).chunk(0).flatten().flatten().to_numpy(zero_copy_only=False)
            target[keep] = torch.tensor(values.reshape(-1, top_k)).to(target.dtype)
        answer.valid[keep] = torch.tensor(valid_col.flatten().to_numpy(zero_copy_only=False))
        answer.nll_per_token.copy_(torch.tensor(table.column("nll_per_token").to_numpy()))
        answer.nll_per_byte.copy_(torch.tensor(table.column("nll_per_byte").to_numpy()))
    return answer
