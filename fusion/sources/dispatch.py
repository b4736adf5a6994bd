"""The trainer side of a disaggregated run: ``EngineSources`` talks to the source engine groups.

``request`` sends the texts to a live replica of each chosen source and posts the receive buffers
for the reply at once, so the sources compute while the trainer trains on earlier batches;
``collect`` waits (with a deadline) for the replies. It implements ``fusion.sources.base.Sources``:
per source, the answer for the whole batch (rows not answered stay invalid) and an ``[B, S]`` mask
of the rows that did get an answer. A source gets every document of a row alone (packed rows hold
several: ``fusion.data.Segments``) and its answers are placed in the rows here; a source that times out, fails or dies is marked down and its
rows are simply not answered.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from fusion.config import SourceConfig
from fusion.sources.answer import SparseSoftLabels
from fusion.sources.base import SourceCounters, place_segments
from fusion.sources.wire import (HEADER_SIZE, TO_SOURCE_TAG, TO_TRAINER_TAG, Channel, Header, Kind, PeerLost,
                                 encode_texts)
from fusion.topology import Topology

STOP_GRACE_S = 5.0  # how long a failing trainer waits for the sources to take its STOP


class SourceFailed(RuntimeError):
    """A source failed every request it was sent: a broken source, not a passing fault to train around."""


class _LeaderLink:
    """Waits on one leader's messages in a thread of its own, so the trainer can give up on a hung
    source after a deadline without a gloo timeout (which would close every pair of the group).

    Jobs run in submission order, matching the order of the leader's messages to this rank.
    """

    def __init__(self, leader: int):
        self.leader = leader
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name=f"leader-{leader}", daemon=True).start()

    def submit(self, job: Callable[[], object]) -> "_Job":
        pending = _Job()
        self.jobs.put((job, pending))
        return pending

    def _run(self) -> None:
        lost = None
        while True:
            job, pending = self.jobs.get()
            if lost is None:
                try:
                    pending.value = job()
                except PeerLost as error:
                    lost = str(error)
            pending.error = lost
            pending.done.set()


@dataclass
class _Job:
    done: threading.Event = field(default_factory=threading.Event)
    value: object = None
    error: str | None = None


@dataclass
class _InFlight:
    """One request sent to one replica, with the buffers its reply is received into (the posted
    receives hold them too, so a reply arriving after the trainer gave up lands safely)."""

    source: int
    replica: int
    documents: list[int]  # the micro-batch's documents sent (indices into its ``Segments``)
    step: int
    request_id: int
    job: _Job
    header: torch.Tensor
    answer: SparseSoftLabels
    valid: torch.Tensor
    nll: torch.Tensor


class EngineSources:
    """Trainer-side client of every source engine group (one per source, ``replicas`` leaders each).

    Args:
        specs: the run's sources in config order.
        topology: this trainer rank's topology (its exchange group and the plan's leaders).
        top_k: candidates per position (the reply's shape).
        request_timeout_s: deadline of one reply once the trainer needs it.
        startup_timeout_s: deadline for each leader's READY (model loading).
    """

    overlaps = True

    def __init__(self, specs: Sequence[SourceConfig], topology: Topology, top_k: int, request_timeout_s: float,
                 startup_timeout_s: float):
        self.names = [spec.name for spec in specs]
        self.batch_sizes = [spec.batch_size for spec in specs]
        self.top_k = top_k
        self.request_timeout_s = request_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.topology = topology
        self.channel = Channel(topology.exchange, send_tag=TO_SOURCE_TAG, recv_tag=TO_TRAINER_TAG)
        roles = {role.name: role for role in topology.plan.roles}
        self.links = [[_LeaderLink(leader) for leader in roles[name].leaders] for name in self.names]
        self.replica_down = [[False] * len(links) for links in self.links]
        self.outstanding = [[0] * len(links) for links in self.links]
        self.counters = [SourceCounters() for _ in specs]
        self.down_reasons: list[dict[str, str]] = [{} for _ in specs]  # per source: replica -> why it went down
        self.answered = [0] * len(specs)  # requests each source answered (counted on this rank)
        self.next_request_id = 0
        self.closed = False

    def __len__(self) -> int:
        return len(self.names)

    def _replicas(self):
        for source, links in enumerate(self.links):
            for replica, link in enumerate(links):
                yield source, replica, link

    def _wait(self, source: int, replica: int, job: _Job, timeout_s: float, what: str) -> bool:
        """Wait for ``job``; False (and the replica marked down) when it failed or ran past ``timeout_s``."""
        if not job.done.wait(timeout_s):
            self._mark_down(source, replica, f"{what}: timed out after {timeout_s:g} s")
            return False
        if job.error is not None:
            self._mark_down(source, replica, f"{what}: {job.error}")
            return False
        return True

    # --------------------------------------------------------------------------------------------
    def ready(self) -> None:
        """Receive every leader's READY (vocabulary coverage); a leader that never answers is down."""
        jobs = [(source, replica, link.submit(lambda leader=link.leader: self.channel.recv_json(leader)))
                for source, replica, link in self._replicas()]
        deadline = time.monotonic() + self.startup_timeout_s
        for source, replica, job in jobs:
            if self._wait(source, replica, job, max(0.0, deadline - time.monotonic()), "loading"):
                self.counters[source].coverage = job.value["coverage"]

    @property
    def available(self) -> torch.Tensor:
        """``[S]`` bool: sources with at least one live replica."""
        return torch.tensor([not all(down) for down in self.replica_down], dtype=torch.bool)

    def _mark_down(self, source: int, replica: int, reason: str, failure: bool = True) -> None:
        if not self.replica_down[source][replica]:
            self.replica_down[source][replica] = True
            self.counters[source].failures += int(failure)
            self.down_reasons[source][f"replica{replica}"] = reason
            print(f"trainer rank {self.topology.dp_rank}: source {self.names[source]} replica {replica} is down: {reason}",
                  flush=True)

    def agree_on_down(self, group) -> None:
        """Make every trainer rank see a source down once one rank saw it down."""
        down = torch.tensor([float(all(replicas)) for replicas in self.replica_down], dtype=torch.float64)
        if self.topology.dp_size > 1:
            dist.all_reduce(down, op=dist.ReduceOp.MAX, group=group)
        for source, is_down in enumerate(down.tolist()):
            if is_down:
                for replica in range(len(self.links[source])):
                    self._mark_down(source, replica, "down on another trainer rank", failure=False)

    def _pick_replica(self, source: int) -> int | None:
        """The live replica with the fewest requests in flight from this rank (ties rotate by rank)."""
        live = [replica for replica, down in enumerate(self.replica_down[source]) if not down]
        if not live:
            return None
        count = len(self.links[source])
        return min(live, key=lambda r: (self.outstanding[source][r], (r - self.topology.dp_rank) % count))

    # --------------------------------------------------------------------------------------------
    def request(self, batch: dict, chosen: torch.Tensor, step: int) -> tuple[dict, list[_InFlight]]:
        """Send the documents of the chosen rows to each chosen source (in ``batch_size`` pieces, each
        document alone); post the replies' buffers."""
        segments = batch["segments"]
        in_flight = []
        for source, batch_size in enumerate(self.batch_sizes):
            documents = segments.of_rows(chosen[:, source].nonzero().flatten().tolist())
            for start in range(0, len(documents), batch_size):
                piece = documents[start:start + batch_size]
                replica = self._pick_replica(source)
                if replica is None:
                    break
                length = max(segments.lengths[index] for index in piece)
                sent = self._send(source, replica, piece, [segments.texts[index] for index in piece], length, step)
                if sent is not None:
                    in_flight.append(sent)
                    counters = self.counters[source]
                    counters.requests += 1
                    counters.sequences += len(piece)
                    counters.tokens += sum(segments.lengths[index] for index in piece)
        return batch, in_flight

    def _send(self, source: int, replica: int, documents: list[int], texts: list[str], length: int, step: int) -> _InFlight | None:
        link = self.links[source][replica]
        request_id = self.next_request_id
        self.next_request_id += 1
        lengths, data = encode_texts(texts)
        header = Header(Kind.REQUEST, step, request_id, len(documents), length, data.numel())
        answer = SparseSoftLabels.empty(len(documents), length, self.top_k, torch.float32)
        reply_header = torch.empty(HEADER_SIZE, dtype=torch.int64)
        valid = torch.empty(len(documents), length, dtype=torch.uint8)
        nll = torch.empty(2, len(documents), dtype=torch.float32)
        try:
            # Receives are posted first: the leader's reply never waits for this rank to be ready for it.
            works = [self.channel.post_recv(link.leader, tensor) for tensor in (reply_header, answer.indices, answer.logprobs, valid, nll)]
            works = [self.channel.post_send(link.leader, tensor) for tensor in (header.tensor(), lengths, data)] + works
        except PeerLost as error:
            self._mark_down(source, replica, str(error))
            return None

        def wait_for_reply() -> None:
            for work in works:
                self.channel.wait(work, link.leader)

        self.outstanding[source][replica] += 1
        return _InFlight(source, replica, documents, step, request_id, link.submit(wait_for_reply), reply_header, answer, valid, nll)

    def collect(self, ticket: tuple[dict, list[_InFlight]]) -> tuple[list[SparseSoftLabels], torch.Tensor]:
        """Wait for the replies of ``ticket``; rows with a document of a failed or down source come back unanswered."""
        batch, in_flight = ticket
        batch_size, length = batch["input_ids"].shape
        pieces = [[] for _ in self.names]
        for sent in in_flight:
            reply = self._reply(sent)
            if reply is not None:
                pieces[sent.source].append((sent.documents, reply))
        placed = [place_segments(batch["segments"], source_pieces, batch_size, length, self.top_k) for source_pieces in pieces]
        answers = [answer for answer, _ in placed]
        arrived = torch.stack([rows for _, rows in placed], dim=1) if placed else torch.zeros(batch_size, 0, dtype=torch.bool)
        return answers, arrived

    def _reply(self, sent: _InFlight) -> SparseSoftLabels | None:
        source, replica = sent.source, sent.replica
        self.outstanding[source][replica] -= 1
        if self.replica_down[source][replica]:
            return None
        counters = self.counters[source]
        started = time.perf_counter()
        arrived = self._wait(source, replica, sent.job, self.request_timeout_s, f"request {sent.request_id} (step {sent.step})")
        counters.waited += time.perf_counter() - started
        if not arrived:
            return None
        header = Header.from_tensor(sent.header)
        if (header.step, header.request_id) != (sent.step, sent.request_id):
            self._mark_down(source, replica, f"the reply to (step {header.step}, request {header.request_id}) arrived "
                                             f"for (step {sent.step}, request {sent.request_id})")
            return None
        if header.kind == Kind.FAILED:
            reason = f"request {sent.request_id} (step {sent.step}) failed at the source (its traceback is in its log)"
            if not self.answered[source]:
                raise SourceFailed(f"source {self.names[source]!r} failed the first request it got, {reason}; training "
                                   "without it would silently drop its labels, so the run stops: fix the source (see "
                                   f"sources[{source}] in the config) and rerun")
            self._mark_down(source, replica, reason)
            return None
        self.answered[source] += 1
        counters.seconds += header.compute_us / 1e6
        answer = sent.answer
        return SparseSoftLabels(answer.indices, answer.logprobs, sent.valid.bool(), sent.nll[0], sent.nll[1])

    # --------------------------------------------------------------------------------------------
    def close(self, collect_reports: bool = True) -> dict:
        """Tell every live leader this rank is done (once); trainer rank 0 also collects what each served.

        ``collect_reports`` False (the trainer failed) only says STOP: other trainer ranks may never
        get that far, and the leaders report only once every trainer rank is done.
        """
        if self.closed:
            return {}
        self.closed = True
        live = [(source, replica, link) for source, replica, link in self._replicas() if not self.replica_down[source][replica]]
        stops = [(source, replica, link.submit(lambda leader=link.leader: self.channel.send_message(leader, Header(Kind.STOP), [])))
                 for source, replica, link in live]
        # A failing trainer does not wait long: a source still loading takes the STOP later, or
        # sees this process's connections close when it exits.
        deadline = time.monotonic() + (self.request_timeout_s if collect_reports else STOP_GRACE_S)
        for source, replica, job in stops:
            self._wait(source, replica, job, max(0.0, deadline - time.monotonic()), "stopping")
        if self.topology.dp_rank != 0 or not collect_reports:
            return {}
        reports = [(source, replica, link.submit(lambda leader=link.leader: self.channel.recv_json(leader)))
                   for source, replica, link in live if not self.replica_down[source][replica]]
        served = {name: [] for name in self.names}
        for source, replica, job in reports:
            if self._wait(source, replica, job, self.request_timeout_s, "final report"):
                served[self.names[source]].append(job.value)
        return served
