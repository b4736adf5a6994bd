"""Start-up that fails still releases DeepSpeed's CPU all-reduce segments in /dev/shm."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from experiments.local_runs import free_port

pytestmark = pytest.mark.distributed

# Rank 1 opens DeepSpeed's communication (creating its segment and mapping rank 0's), then is
# killed before it can unlink anything; rank 0 runs the real start-up, whose barrier then fails.
RANK = """
import os, signal
from pathlib import Path
from fusion.topology import LaunchEnv, RankPlan, RoleSpec, init_deepspeed_comm, init_topology, shared_memory_segment
env = LaunchEnv.from_mapping(os.environ)
topology = init_topology(RankPlan((RoleSpec("trainer", (0, 1)),)), env, "gloo", timeout_s=60)
if env.rank == 1:
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    print("segments exist:", all(shared_memory_segment(rank).exists() for rank in (0, 1)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
init_deepspeed_comm(topology, "gloo")
"""


def test_a_rank_dying_during_start_up_leaks_no_shared_memory():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "LOCAL_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in (0, 1)]
    try:
        (out0, err0), (out1, err1) = (rank.communicate(timeout=240) for rank in ranks)
    finally:
        for rank in ranks:
            rank.kill()
    assert ranks[1].returncode == -9 and "segments exist: True" in out1, err1[-3000:]
    assert ranks[0].returncode == 1, err0[-3000:]
    left = sorted(path.name for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"))
    assert left == [], left
