"""Starting local runs: the single-node ``deepspeed`` command on a free port, for the programs that
start training runs (the comparison, the dispatch benchmark, the tests)."""
from __future__ import annotations

import os
import socket
import sys


def free_port() -> int:
    """A single-node MASTER_PORT: a TCP port on this host that is free now, and so is the next
    one, where ``init_topology`` opens the run's store."""
    while True:
        with socket.socket() as master, socket.socket() as store:
            master.bind(("127.0.0.1", 0))
            port = master.getsockname()[1]
            try:
                store.bind(("127.0.0.1", port + 1))
            except (OSError, OverflowError):  # taken, or past the last port
                continue
            return port


def single_node_command(script: str | os.PathLike, config: str | os.PathLike, world_size: int) -> list[str]:
    """``deepspeed --num_gpus <world_size> <script> --config <config>`` on a free master port, with this
    interpreter (for programs that start runs: the comparison, benchmarks, tests)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world_size), "--master_port",
            str(free_port()), str(script), "--config", str(config)]
