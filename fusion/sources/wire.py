"""The messages between trainer ranks and source group leaders on the exchange group.

Every message is a fixed-size int64 header followed by the tensors its kind needs, all sent
point-to-point with one tag per direction, so the messages of one (sender, receiver) pair
arrive in order. A peer whose connection closed raises ``PeerLost``; the trainer keeps its own
deadline on every reply; either way the source is then marked down.

    trainer -> leader   REQUEST  header [REQUEST, step, request_id, rows, length, text_bytes]
                                 + int64[rows] text lengths + uint8[text_bytes] UTF-8 texts
                        STOP     header only
    leader -> trainer   READY    header [READY, ..., json_bytes] + uint8 JSON (vocab coverage)
                        ANSWER   header [ANSWER, step, request_id, rows, length, top_k, compute_us]
                                 + int32 indices [rows, L, k] + float32 logprobs [rows, L, k]
                                 + uint8 valid [rows, L] + float32 nll [2, rows] (per token, per byte)
                        FAILED   header [FAILED, step, request_id] (the source raised; see its log)
                        STATS    header [STATS, ..., json_bytes] + uint8 JSON (what the leader served)
"""
from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.distributed as dist

from fusion.sources.answer import SparseSoftLabels

HEADER_SIZE = 8
UNBOUNDED_WAIT = datetime.timedelta(days=365)
TO_SOURCE_TAG = 11
TO_TRAINER_TAG = 12


class Kind(IntEnum):
    REQUEST = 1
    STOP = 2
    READY = 3
    ANSWER = 4
    FAILED = 5
    STATS = 6


class PeerLost(RuntimeError):
    """The connection to a peer closed (it died, or its side gave up on this one)."""


@dataclass(frozen=True)
class Header:
    kind: Kind
    step: int = 0
    request_id: int = 0
    rows: int = 0
    length: int = 0
    size: int = 0  # text bytes, JSON bytes or top-k: whatever the kind's payload needs
    compute_us: int = 0

    def tensor(self) -> torch.Tensor:
        values = [int(self.kind), self.step, self.request_id, self.rows, self.length, self.size, self.compute_us]
        return torch.tensor(values + [0] * (HEADER_SIZE - len(values)), dtype=torch.int64)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> "Header":
        kind, step, request_id, rows, length, size, compute_us, _ = tensor.tolist()
        return cls(Kind(kind), step, request_id, rows, length, size, compute_us)


class Channel:
    """Point-to-point messages on the exchange group.

    No wait here ever has a gloo deadline: a gloo timeout closes *every* pair of the group (one
    hung source would cut the trainer off from all of them). Deadlines are kept by the caller
    (``EngineSources`` waits in a thread per leader); a dead peer still raises at once.

    Args:
        group: the exchange process group (gloo).
        send_tag, recv_tag: this side's tag and the other direction's.
    """

    def __init__(self, group: "dist.ProcessGroup", send_tag: int, recv_tag: int):
        self.group = group
        self.send_tag = send_tag
        self.recv_tag = recv_tag

    def post_send(self, peer: int, tensor: torch.Tensor) -> "dist.Work":
        return self._post(self.group.send, peer, tensor.contiguous(), self.send_tag, "sending to")

    def post_recv(self, peer: int, tensor: torch.Tensor) -> "dist.Work":
        """Start receiving into ``tensor``; messages from one peer fill posted buffers in order."""
        return self._post(self.group.recv, peer, tensor, self.recv_tag, "receiving from")

    @staticmethod
    def _post(operation, peer: int, tensor: torch.Tensor, tag: int, what: str) -> "dist.Work":
        try:
            return operation([tensor], peer, tag)
        except RuntimeError as error:
            raise PeerLost(f"{what} rank {peer}: {error}") from None

    @staticmethod
    def wait(work: "dist.Work", peer: int) -> None:
        try:
            work.wait(UNBOUNDED_WAIT)  # a bare wait() would use the group's timeout
        except RuntimeError as error:
            raise PeerLost(f"rank {peer}: {error}") from None

    def send(self, peer: int, tensors: list[torch.Tensor]) -> None:
        for work in [self.post_send(peer, tensor) for tensor in tensors]:
            self.wait(work, peer)

    def recv(self, peer: int, tensor: torch.Tensor) -> torch.Tensor:
        self.wait(self.post_recv(peer, tensor), peer)
        return tensor

    def send_message(self, peer: int, header: Header, payload: list[torch.Tensor]) -> None:
        self.send(peer, [header.tensor(), *payload])

    def recv_header(self, peer: int) -> Header:
        return Header.from_tensor(self.recv(peer, torch.empty(HEADER_SIZE, dtype=torch.int64)))

    def send_json(self, peer: int, kind: Kind, value: dict) -> None:
        data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
        self.send_message(peer, Header(kind, size=data.numel()), [data])

    def recv_json(self, peer: int) -> dict:
        header = self.recv_header(peer)
        data = self.recv(peer, torch.empty(header.size, dtype=torch.uint8))
        return json.loads(bytes(data.tolist()).decode())


def encode_texts(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int64 byte length per text, uint8 concatenated UTF-8)``."""
    encoded = [text.encode("utf-8") for text in texts]
    joined = b"".join(encoded)
    return (torch.tensor([len(data) for data in encoded], dtype=torch.int64),
            torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8))


def decode_texts(lengths: torch.Tensor, data: torch.Tensor) -> list[str]:
    raw = data.numpy().tobytes()
    texts, start = [], 0
    for length in lengths.tolist():
        texts.append(raw[start:start + length].decode("utf-8"))
        start += length
    return texts


def answer_tensors(answer: SparseSoftLabels) -> list[torch.Tensor]:
    return [answer.indices.to(torch.int32), answer.logprobs.float(), answer.valid.to(torch.uint8),
            torch.stack([answer.nll_per_token, answer.nll_per_byte]).float()]
