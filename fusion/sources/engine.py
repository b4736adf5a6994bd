"""One source LLM served by a DeepSpeed inference engine group (``placement: disaggregated``).

Each replica of a source is ``tensor_parallel`` ranks holding one ``deepspeed.init_inference``
engine (AutoTP splits the model over the replica's ranks). The replica's leader takes requests
from every trainer rank, broadcasts each batch's token ids inside the replica so all its ranks
run the same forward pass, scores it with the ``SourceScorer`` the colocated path uses (top-k,
alignment to target positions, vocabulary map), and replies with the sparse answer.

The leader serves until every trainer rank has said STOP or is gone, then tells the rest of
its replica to stop and reports what it served to trainer rank 0.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from fusion.config import Config
from fusion.sources.answer import SparseSoftLabels
from fusion.sources.loading import DTYPES, build_scorer, load_causal_lm, vocab_size_of
from fusion.sources.scoring import encode_with_offsets
from fusion.sources.wire import (TO_SOURCE_TAG, TO_TRAINER_TAG, Channel, Header, Kind, PeerLost, answer_tensors,
                                 decode_texts)
from fusion.topology import Topology

# Followers wait in a collective broadcast, whose process-group timeout would fire during a long
# trainer pause (evaluation, checkpointing); the leader says "still here" this often when idle.
KEEPALIVE_S = 30.0
_RUN, _IDLE, _STOP = 0, 1, 2


@dataclass
class ServedStats:
    """What one replica leader served (counted at the source)."""

    requests: int = 0
    sequences: int = 0
    tokens: int = 0  # target tokens of the texts served
    compute_s: float = 0.0
    failed: int = 0
    by_trainer_rank: dict = field(default_factory=dict)


class SourceEngine:
    """The source role of this process: load, then serve (leader) or follow (other TP ranks)."""

    def __init__(self, config: Config, topology: Topology):
        if topology.is_trainer:
            raise ValueError("SourceEngine runs on source ranks; this is a trainer rank")
        self.config = config
        self.topology = topology
        self.spec = next(source for source in config.sources if source.name == topology.role.name)
        self.tensor_parallel = topology.role.tensor_parallel
        # Role-world rank of this replica's leader (broadcast sources are default-world ranks).
        self.leader_role_rank = topology.replica_index * self.tensor_parallel
        self.device = topology.device
        self.channel = Channel(topology.exchange, send_tag=TO_TRAINER_TAG, recv_tag=TO_SOURCE_TAG)
        self.trainer_ranks = topology.plan.trainer.ranks
        self.replica_lost: str | None = None  # why this replica can no longer compute (a TP rank died)

    def load(self) -> None:
        model = load_causal_lm(self.spec.path, self.spec.dtype, self.spec.attention)
        # Read before AutoTP may split the head.
        vocab_size = vocab_size_of(model)
        if self.device.type == "cpu":
            # DeepSpeed's CPU shared-memory all-reduce ignores the TP group and assumes the whole
            # node is one world; with role-local worlds it is not set up. Use the group's gloo.
            deepspeed.comm.comm.cdb.shm_vector_kernel_level = 0
        self.engine = deepspeed.init_inference(
            model, dtype=DTYPES[self.spec.dtype], replace_with_kernel_inject=False,
            tensor_parallel={"tp_size": self.tensor_parallel, "tp_group": self.topology.replica_group})
        self.engine.module.to(self.device)
        if not self.topology.is_source_leader:
            return
        self.target_tokenizer = AutoTokenizer.from_pretrained(self.config.target)
        fusion = self.config.fusion
        self.scorer = build_scorer(self._forward, vocab_size, self.spec.path, self.target_tokenizer, top_k=fusion.top_k,
                                   temperature=fusion.temperature, max_length=self.config.data.max_length,
                                   vocab_map_dir=Path(self.config.run.cache_dir) / "vocab_maps", device=self.device)

    def run(self) -> ServedStats | None:
        """Serve (leader) or follow until the trainer is done; the leader returns what it served."""
        if not self.topology.is_source_leader:
            self._follow()
            return None
        return self._serve()

    # ---------------------------------------------------------------------------------------------
    def _broadcast_in_replica(self, tensor: torch.Tensor) -> None:
        if self.tensor_parallel > 1:
            dist.broadcast(tensor, src=self.leader_role_rank, group=self.topology.replica_group)

    def _command_replica(self, kind: int) -> None:
        """Tell the followers to idle on or stop; a dead follower leaves the replica unable to compute."""
        if self.replica_lost is not None:
            return
        try:
            self._broadcast_in_replica(torch.tensor([kind, 0, 0], device=self.device))
        except RuntimeError as error:
            self.replica_lost = str(error)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """The scorer's model: every rank of the replica runs the same forward (AutoTP collectives)."""
        self._broadcast_in_replica(torch.tensor([_RUN, *input_ids.shape], device=self.device))
        self._broadcast_in_replica(input_ids)
        self._broadcast_in_replica(attention_mask)
        return self.engine(input_ids=input_ids, attention_mask=attention_mask)

    @torch.inference_mode()
    def _follow(self) -> None:
        while True:
            command = torch.empty(3, dtype=torch.long, device=self.device)
            self._broadcast_in_replica(command)
            kind, rows, width = command.tolist()
            if kind == _STOP:
                return
            if kind == _IDLE:
                continue
            input_ids = torch.empty(rows, width, dtype=torch.long, device=self.device)
            attention_mask = torch.empty(rows, width, dtype=torch.long, device=self.device)
            self._broadcast_in_replica(input_ids)
            self._broadcast_in_replica(attention_mask)
            self.engine(input_ids=input_ids, attention_mask=attention_mask)

    def _receive(self, trainer_rank: int, inbox: queue.Queue) -> None:
        """One thread per trainer rank: requests into ``inbox`` until STOP, or until the rank is gone."""
        try:
            while True:
                header = self.channel.recv_header(trainer_rank)
                if header.kind == Kind.STOP:
                    inbox.put((trainer_rank, header, None))
                    return
                lengths = self.channel.recv(trainer_rank, torch.empty(header.rows, dtype=torch.int64))
                data = self.channel.recv(trainer_rank, torch.empty(header.size, dtype=torch.uint8))
                inbox.put((trainer_rank, header, decode_texts(lengths, data)))
        except PeerLost:
            inbox.put((trainer_rank, None, None))

    def _serve(self) -> ServedStats:
        ready = {"coverage": self.scorer.vocab_map.coverage(), "replica": self.topology.replica_index,
                 "tensor_parallel": self.tensor_parallel}
        active = set()
        for rank in self.trainer_ranks:
            try:
                self.channel.send_json(rank, Kind.READY, ready)
                active.add(rank)
            except PeerLost as error:
                print(f"source {self.spec.name}: trainer rank {rank} is unreachable ({error})", file=sys.stderr)
        inbox: queue.Queue = queue.Queue()
        for rank in active:
            threading.Thread(target=self._receive, args=(rank, inbox), daemon=True).start()
        stats = ServedStats()
        stopped = set()
        while active:
            try:
                rank, header, texts = inbox.get(timeout=KEEPALIVE_S)
            except queue.Empty:
                self._command_replica(_IDLE)
                continue
            if header is None or header.kind == Kind.STOP:
                active.discard(rank)
                if header is not None:
                    stopped.add(rank)
                continue
            answer, seconds, tokens = self._answer(texts, header)
            stats.requests += 1
            stats.sequences += len(texts)
            stats.tokens += tokens
            stats.compute_s += seconds
            stats.by_trainer_rank[rank] = stats.by_trainer_rank.get(rank, 0) + len(texts)
            kind = Kind.ANSWER
            if answer is None:
                stats.failed += 1
                kind = Kind.FAILED
                # Same shapes as an answer: the trainer posted its receive buffers with the request.
                answer = SparseSoftLabels.empty(len(texts), header.length, self.config.fusion.top_k, torch.float32)
            reply = Header(kind, header.step, header.request_id, len(texts), header.length, self.config.fusion.top_k,
                           int(seconds * 1e6))
            try:
                self.channel.send_message(rank, reply, answer_tensors(answer))
            except PeerLost as error:
                print(f"source {self.spec.name}: lost trainer rank {rank} ({error})", file=sys.stderr)
                active.discard(rank)
        self._command_replica(_STOP)
        first_trainer = self.trainer_ranks[0]
        if first_trainer in stopped:
            try:
                self.channel.send_json(first_trainer, Kind.STATS, stats.__dict__)
            except PeerLost as error:
                print(f"source {self.spec.name}: could not report to trainer rank {first_trainer} ({error})", file=sys.stderr)
        return stats

    def _answer(self, texts: list[str], header: Header) -> tuple[SparseSoftLabels | None, float, int]:
        """Score one request: ``(answer, seconds, target tokens)``; None (and a logged reason) when it failed."""
        started = time.perf_counter()
        _, target_offsets, _ = encode_with_offsets(self.target_tokenizer, texts, self.config.data.max_length)
        tokens = sum(len(offsets) for offsets in target_offsets)
        if self.replica_lost is not None:
            return None, 0.0, tokens
        try:
            answer = self.scorer.score(texts, target_offsets, header.length)
        except Exception:  # noqa: BLE001 - a failed request is reported to the trainer, not fatal to the source
            print(f"source {self.spec.name}: request {header.request_id} (step {header.step}) failed:\n"
                  f"{traceback.format_exc()}", file=sys.stderr)
            if self.tensor_parallel > 1:
                self.replica_lost = "a forward pass failed inside the tensor-parallel replica"
            return None, time.perf_counter() - started, tokens
        return answer, time.perf_counter() - started, tokens
