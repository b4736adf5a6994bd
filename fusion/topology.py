"""Which rank does what, and every process group of the run. Group creation happens nowhere else.

Ranks are assigned in config order: the trainer first, then each source's
``replicas x tensor_parallel`` ranks (replica-major). Example, 2 trainer ranks, source ``a``
with 1 replica x TP 2, source ``b`` with 2 replicas x TP 1 (world size 6)::

    global rank:   0        1        2        3        4        5
    role:        trainer  trainer  a        a        b        b
    role rank:     0        1        0        1        0        1
    replica:       -        -        0        0        0        1
                 '-- ZeRO-3 DP ---' '- AutoTP -'  '-rep 0-' '-rep 1-'

Each role gets its own *default* world (DeepSpeed's ZeRO-3 calls ``barrier()`` on the default
group; sharing it with source ranks deadlocks). All ranks meet on one TCPStore next to
MASTER_PORT; a role's world is ``init_process_group(store=PrefixStore("role/<name>", store))``.
Cross-role traffic uses one explicit exchange group over all ranks (point-to-point only).
It is gloo even on GPUs: the payloads are small (texts out, sparse top-k answers back), and
gloo gives every wait a timeout and turns a dead peer into an exception, where a NCCL
watchdog would abort the trainer. With ``placement: colocated`` there is only the trainer
role and no exchange group.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist

from fusion.config import Config

TRAINER = "trainer"


# Store keys: each rank's "<host> <pid>", and the end of training.
PROCESS_KEY = "process"
FINISHED_KEY = "training/finished"
FAILURES_KEY = "failures"


class TopologyError(ValueError):
    """The launched world does not match the config's topology."""


@dataclass(frozen=True)
class RoleSpec:
    name: str
    ranks: tuple[int, ...]
    replicas: int = 1
    tensor_parallel: int = 1

    def replica_ranks(self, replica: int) -> tuple[int, ...]:
        start = replica * self.tensor_parallel
        return self.ranks[start:start + self.tensor_parallel]

    @property
    def leaders(self) -> tuple[int, ...]:
        """Global rank of each replica's leader (the rank that talks to the trainer)."""
        return tuple(self.ranks[replica * self.tensor_parallel] for replica in range(self.replicas))


@dataclass(frozen=True)
class RankPlan:
    roles: tuple[RoleSpec, ...]

    @property
    def world_size(self) -> int:
        return sum(len(role.ranks) for role in self.roles)

    @property
    def trainer(self) -> RoleSpec:
        return self.roles[0]

    def role_of(self, global_rank: int) -> RoleSpec:
        for role in self.roles:
            if global_rank in role.ranks:
                return role
        raise TopologyError(f"rank {global_rank} is outside the planned world of {self.world_size} ranks")

    def diagram(self) -> str:
        return "\n".join(f"  {role.name:<16} ranks {list(role.ranks)}" +
                         ("" if role.name == TRAINER else f"  ({role.replicas} replica(s) x tensor_parallel {role.tensor_parallel})")
                         for role in self.roles)


def plan_ranks(config: Config, world_size: int) -> RankPlan:
    """Assign global ranks to roles; raise ``TopologyError`` showing the expected layout on mismatch."""
    plan = rank_plan(config)
    if plan.world_size != world_size:
        raise TopologyError(
            f"the launcher started {world_size} rank(s) but the config's topology needs {plan.world_size}:\n"
            f"{plan.diagram()}\n"
            f"launch with that many ranks (e.g. `deepspeed --num_gpus {plan.world_size} ...`) "
            f"or change topology.trainer_ranks / sources[*].replicas / sources[*].tensor_parallel")
    return plan


def rank_plan(config: Config) -> RankPlan:
    """The roles of the config's topology, in rank order."""
    roles = [RoleSpec(TRAINER, tuple(range(config.topology.trainer_ranks)))]
    if config.topology.placement == "disaggregated" and config.fusion.mode != "none":
        next_rank = config.topology.trainer_ranks
        for source in config.sources:
            size = source.replicas * source.tensor_parallel
            roles.append(RoleSpec(source.name, tuple(range(next_rank, next_rank + size)), source.replicas, source.tensor_parallel))
            next_rank += size
    return RankPlan(tuple(roles))


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher tells a process about itself (torchrun / deepspeed / SLURM conventions).

    ``local_size`` is the number of ranks on this node; ``cpus_per_task`` is SLURM's
    ``--cpus-per-task`` (None when not given).
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    local_size: int = 1
    cpus_per_task: int | None = None

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> "LaunchEnv":
        """Read RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE / LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
        (deepspeed, torchrun), else SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and this node's entry of
        SLURM_STEP_TASKS_PER_NODE (one `srun` task per rank, ``--ntasks`` alone or per node);
        SLURM_CPUS_PER_TASK. A plain `python` run is rank 0 of 1."""
        def first(*names: str, default):
            return next((env[name] for name in names if name in env), default)

        try:
            local_size = first("LOCAL_SIZE", "LOCAL_WORLD_SIZE", default=None)
            per_node = first("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", default=None)
            if local_size is None and per_node is not None:
                counts, node = slurm_tasks_per_node(per_node), int(env.get("SLURM_NODEID", 0))
                if not 0 <= node < len(counts):
                    raise ValueError(f"SLURM_NODEID={node} but SLURM_STEP_TASKS_PER_NODE={per_node} has {len(counts)} node(s)")
                local_size = counts[node]
            cpus = env.get("SLURM_CPUS_PER_TASK")
            return cls(rank=int(first("RANK", "SLURM_PROCID", default=0)),
                       world_size=int(first("WORLD_SIZE", "SLURM_NTASKS", default=1)),
                       local_rank=int(first("LOCAL_RANK", "SLURM_LOCALID", default=0)),
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", 29500)),
                       local_size=int(local_size or 1), cpus_per_task=int(cpus) if cpus else None)
        except ValueError as error:
            raise TopologyError(f"malformed launcher environment: {error}") from None

    def cpu_threads(self, cpu_count: int) -> int:
        """Torch CPU threads for this rank: SLURM's ``--cpus-per-task`` when given, else this node's
        ``cpu_count`` CPUs shared by its ranks."""
        return self.cpus_per_task or max(1, cpu_count // self.local_size)

    def gpu_index(self, visible_gpus: int) -> int:
        """The CUDA device of this rank: its local rank when the node's GPUs are all visible
        (deepspeed, a whole-node srun), 0 when the task sees a single GPU (``srun --gpus-per-task=1``,
        where every task's GPU is its ``cuda:0``; or ranks of different roles sharing a 1-GPU machine).

        Raises:
            TopologyError: more local ranks than visible GPUs.
        """
        if visible_gpus == 1:
            return 0
        if self.local_rank >= visible_gpus:
            raise TopologyError(f"local rank {self.local_rank} but this process sees {visible_gpus} GPU(s) "
                                "(CUDA_VISIBLE_DEVICES); start one rank per GPU, or give each task one GPU (--gpus-per-task=1)")
        return self.local_rank


def slurm_tasks_per_node(value: str) -> list[int]:
    """SLURM's compressed task counts per node, ``"3(x2),1"`` -> ``[3, 3, 1]``."""
    counts = []
    for part in value.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts


@dataclass(frozen=True)
class Topology:
    """This process's place in the run and its groups, built once by ``init_topology``.

    ``role_group`` is the role-local default world (the trainer's is ZeRO-3's data-parallel
    world); ``source_groups`` holds, on a source rank, one group per replica of its source
    (its TP group); ``exchange`` is None with a single role.
    """

    plan: RankPlan
    global_rank: int
    role: RoleSpec
    role_rank: int
    exchange: "dist.ProcessGroup | None"
    replica_group: "dist.ProcessGroup | None"
    device: torch.device
    store: "dist.Store"  # the run's store (hosted by global rank 0)

    @property
    def is_trainer(self) -> bool:
        return self.role.name == TRAINER

    @property
    def trainer_group(self) -> "dist.ProcessGroup":
        if not self.is_trainer:
            raise TopologyError(f"rank {self.global_rank} is a {self.role.name!r} rank, not a trainer rank")
        return dist.group.WORLD

    @property
    def dp_rank(self) -> int:
        return self.role_rank if self.is_trainer else 0

    @property
    def dp_size(self) -> int:
        return len(self.plan.trainer.ranks)

    @property
    def replica_index(self) -> int:
        return self.role_rank // self.role.tensor_parallel

    @property
    def is_source_leader(self) -> bool:
        return not self.is_trainer and self.global_rank in self.role.leaders

    @property
    def is_logging_rank(self) -> bool:
        return self.global_rank == 0

    def trainer_sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` (as float64, on the CPU) summed over the trainer ranks; ``value`` is left as it is."""
        value = value.detach().to(self.device, torch.float64).clone()
        if self.dp_size > 1:
            dist.all_reduce(value, group=self.trainer_group)
        return value.cpu()

    def announce_finished(self) -> None:
        """Tell every rank that training is over (a rank that hangs can then end itself)."""
        self.store.set(FINISHED_KEY, "1")

    def run_finished(self) -> bool:
        """Whether the trainer announced the end of training; raises RuntimeError once the store is gone."""
        return self.store.check([FINISHED_KEY])

    def first_failure(self) -> bool:
        """Count a failure of this rank; True for the first rank of the run to fail (or when the store is
        gone, so nothing is known), so that one line, not one per rank, tells the user the cause."""
        try:
            return self.store.add(FAILURES_KEY, 1) == 1
        except RuntimeError:
            return True

    def local_processes(self) -> dict[int, int]:
        """``{global rank: pid}`` of the other ranks on this host (each registered itself at start-up)."""
        host = socket.gethostname()
        processes = {}
        for rank in range(self.plan.world_size):
            key = f"{PROCESS_KEY}/{rank}"
            if rank == self.global_rank or not self.store.check([key]):  # a rank that never started
                continue
            other_host, pid = self.store.get(key).decode().rsplit(" ", 1)
            if other_host == host:
                processes[rank] = int(pid)
        return processes

    def trainer_mean_(self, tensors) -> None:
        """Average each of ``tensors`` over the trainer ranks, in place."""
        for tensor in tensors:
            if self.dp_size > 1:
                dist.all_reduce(tensor, group=self.trainer_group)
                tensor /= self.dp_size


def init_topology(plan: RankPlan, env: LaunchEnv, backend: str, timeout_s: float = 600.0,
                  trainer_timeout_s: float | None = None) -> Topology:
    """Open the role-local default world and the exchange group for this process.

    ``timeout_s`` bounds joining the run and the exchange group's waits; ``trainer_timeout_s``
    (default ``timeout_s``) bounds every collective of the trainer's world, so a trainer rank that
    hangs ends the run after that long. Must run before ``init_deepspeed_comm``, whose
    ``deepspeed.init_distributed`` then reuses the default world.
    """
    if env.world_size != plan.world_size:
        raise TopologyError(f"WORLD_SIZE={env.world_size} but the plan needs {plan.world_size} ranks:\n{plan.diagram()}")
    timeout = datetime.timedelta(seconds=timeout_s)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", env.gpu_index(torch.cuda.device_count()))
        torch.cuda.set_device(device)
    role = plan.role_of(env.rank)
    role_rank = role.ranks.index(env.rank)
    # One store for everything, next to MASTER_PORT so multi-node runs need no extra ports.
    store = dist.TCPStore(env.master_addr, env.master_port + 1, env.world_size, is_master=env.rank == 0, timeout=timeout)
    store.set(f"{PROCESS_KEY}/{env.rank}", f"{socket.gethostname()} {os.getpid()}")
    role_timeout = datetime.timedelta(seconds=trainer_timeout_s or timeout_s) if role.name == TRAINER else timeout
    dist.init_process_group(backend, store=dist.PrefixStore(f"role/{role.name}", store),
                            rank=role_rank, world_size=len(role.ranks), timeout=role_timeout)
    # Libraries that read the launcher's variables must see the world they live in, the role's
    # (DeepSpeed's zero.Init refuses a 1-rank default world when WORLD_SIZE says more), and the
    # GPU this rank uses (DeepSpeed's engine picks cuda:LOCAL_RANK).
    local_rank = device.index if device.type == "cuda" else env.local_rank
    os.environ.update(RANK=str(role_rank), WORLD_SIZE=str(len(role.ranks)), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    exchange = None
    if len(plan.roles) > 1:
        exchange = dist.ProcessGroupGloo(dist.PrefixStore("exchange", store), env.rank, env.world_size, timeout)
    replica_group = None
    if role.name != TRAINER:
        # new_group is collective over the role's world: every replica's group is created on every rank.
        for replica in range(role.replicas):
            members = [role.ranks.index(rank) for rank in role.replica_ranks(replica)]
            group = dist.new_group(members)
            if role_rank in members:
                replica_group = group
    return Topology(plan, env.rank, role, role_rank, exchange, replica_group, device, store)


def init_deepspeed_comm(topology: Topology, backend: str) -> None:
    """``deepspeed.init_distributed`` over the role's default world, then unlink this rank's
    shared-memory segment.

    On CPU, when the world is all local, DeepSpeed's all-reduce op maps one 69 MB POSIX
    shared-memory segment per rank and never unlinks it: every run left world-size x 69 MB of
    RAM-backed /dev/shm behind, until the machine ran out of memory. Once every rank of the role
    has mapped its peers' segments (all have returned from ``init_distributed`` and met at a
    barrier) the names can go; the mappings stay valid until the processes exit.

    When this fails (a peer died or failed on its way in, so the run cannot start), this rank
    unlinks the segment of every rank of its role on this machine before raising: its own, and
    those of peers that were killed before they could unlink theirs.
    """
    import deepspeed

    try:
        deepspeed.init_distributed(dist_backend=backend)
        dist.barrier()
    except BaseException:
        for role_rank in range(len(topology.role.ranks)):
            shared_memory_segment(role_rank).unlink(missing_ok=True)
        raise
    shared_memory_segment(topology.role_rank).unlink(missing_ok=True)


def shared_memory_segment(role_rank: int) -> Path:
    """Where DeepSpeed's CPU all-reduce keeps this rank's segment, when it makes one."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
                               f"{os.environ['MASTER_PORT']}_{role_rank}")


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
