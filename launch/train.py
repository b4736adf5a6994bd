"""Train the target on one run config.

    deepspeed --num_gpus N launch/train.py --config configs/demo.yaml [--set trainer.lr=1e-4 ...]
    python launch/train.py --config configs/demo.yaml --world-size     # prints N

Trainer ranks train; with ``placement: disaggregated`` the other ranks serve the sources.

The config is read and validated, and the world size checked against its topology, before
any process group opens or any model loads.
"""
import argparse
import os
import sys
import traceback

import torch

from fusion.config import ConfigError, load_config
from fusion.finished import finished_run
from fusion.topology import (LaunchEnv, TopologyError, default_backend, init_deepspeed_comm, init_topology, plan_ranks, rank_plan,
                             shutdown)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run YAML, e.g. configs/demo.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set trainer.lr=1e-4 (repeatable)")
    parser.add_argument("--world-size", action="store_true",
                        help="print how many ranks the config's topology needs (for --num_gpus) and exit")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = parser.parse_args()

    env = LaunchEnv.from_mapping(os.environ)
    try:
        config = load_config(args.config, args.set)
        if args.world_size:
            print(rank_plan(config).world_size)
            return 0
        plan = plan_ranks(config, env.world_size)
        finished = finished_run(config)  # before anything is written: a finished run is never retrained
    except (ConfigError, TopologyError) as error:
        if env.rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2
    if finished:
        if env.rank == 0:
            print(finished)
        return 0

    local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(config.trainer.num_threads or max(1, (os.cpu_count() or 1) // local_ranks))

    # Imported late: DeepSpeed and transformers take seconds to import, config errors should not wait.
    from fusion.sources.engine import SourceEngine
    from fusion.trainer import Trainer

    backend = default_backend()
    topology = init_topology(plan, env, backend, timeout_s=config.topology.startup_timeout_s)
    init_deepspeed_comm(topology, backend)
    if not topology.is_trainer:
        return serve_source(SourceEngine(config, topology))
    trainer = Trainer(config, topology)
    try:
        trainer.setup()
        result = trainer.train()
    except ConfigError as error:  # found only once the data or models are open
        if topology.is_logging_rank:
            print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        print(f"error: trainer rank {topology.dp_rank} failed (traceback above); the source groups were told to stop",
              file=sys.stderr)
        return 1
    finally:
        trainer.cleanup()
        shutdown()
    if topology.is_logging_rank:
        print_summary(result)
    return 0


def serve_source(engine) -> int:
    """A source rank: load the model, serve until the trainer is done."""
    try:
        engine.load()
        served = engine.run()
    finally:
        shutdown()
    if served is not None:
        print(f"source {engine.spec.name} replica {engine.topology.replica_index}: served {served.requests} requests, "
              f"{served.sequences} sequences in {served.compute_s:.1f} s of compute ({served.failed} failed)")
    return 0


def print_summary(result) -> None:
    print(f"\nfinished {result.steps} steps ({result.tokens} tokens) in {result.seconds:.0f} s; "
          f"training loss {result.first_loss:.3f} -> {result.final_loss:.3f} (means of the first and last 5 steps)")
    print("held-out, before -> after:" if result.eval_before else "held-out:")
    for domain, row in result.eval.items():
        before = result.eval_before.get(domain)

        def shown(key: str, spec: str) -> str:
            return (f"{before[key]:{spec}} -> " if before else "") + f"{row[key]:{spec}}"

        print(f"  eval {domain:<12} perplexity {shown('perplexity', '8.2f')}  bits/byte {shown('bits_per_byte', '.3f')}")
    if result.sources:
        domains = list(result.routing)
        print(f"\n  {'source':<24}{'requests':>9}{'sequences':>10}{'latency':>9}{'waited':>8}{'fail':>5}  "
              + "".join(f"{domain[:11]:>12}" for domain in domains) + "   (selection rate per domain)")
        for name, entry in result.sources.items():
            latency = entry["compute_s"] / max(entry["requests"], 1)
            rates = "".join(f"{result.routing[domain][name]['selection_rate']:>12.2f}" for domain in domains)
            state = "  DOWN" if entry["down"] else ""
            print(f"  {name:<24}{entry['requests']:>9}{entry['sequences']:>10}{latency:>8.2f}s{entry['waited_s']:>7.1f}s"
                  f"{entry['failures']:>5}  {rates}{state}")
    print(f"model:       {result.model_dir}")
    print(f"tensorboard: tensorboard --logdir {result.tensorboard_dir}")


if __name__ == "__main__":
    exit_code = main()
    # Everything is written and closed by now. A rank of a finished run was seen to abort on its
    # way out ("terminate called without an active exception", exit -6): interpreter finalisation
    # tears down DeepSpeed's and gloo's leftover C++ objects and threads. Skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
