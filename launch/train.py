"""Train the target on one run config.

    deepspeed --num_gpus N launch/train.py --config configs/demo.yaml [--set trainer.lr=1e-4 ...]
    python launch/train.py --config configs/demo.yaml --world-size     # prints N
    python launch/train.py --config configs/demo.yaml --output-dir     # prints run.output_dir

Trainer ranks train; with ``placement: disaggregated`` the other ranks serve the sources.

The config is read and validated, and the world size checked against its topology, before
any process group opens or any model loads.
"""
import argparse
import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from fusion.config import ConfigError, load_config
from fusion.finished import finished_run
from fusion.topology import (LaunchEnv, TopologyError, default_backend, init_deepspeed_comm, init_topology, plan_ranks, rank_plan,
                             shutdown)


WATCH_S = 1.0  # how often a source rank looks for the end of training
ERROR_GRACE_S = 2.0  # how long the other ranks wait before exiting on an error rank 0 reports
STOP_SIGNAL = signal.SIGUSR1  # checkpoint and stop at the next step boundary
INTERRUPTED = 3  # exit code of a run stopped on request with its checkpoint saved (rerun to resume)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run YAML, e.g. configs/demo.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set trainer.lr=1e-4 (repeatable)")
    parser.add_argument("--world-size", action="store_true",
                        help="print how many ranks the config's topology needs (for --num_gpus) and exit")
    parser.add_argument("--output-dir", action="store_true",
                        help="print the run's output_dir and exit (after --world-size when both are given)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = parser.parse_args()

    env = LaunchEnv.from_mapping(os.environ)
    try:
        config = load_config(args.config, args.set)
        if args.world_size or args.output_dir:
            if args.world_size:
                print(rank_plan(config).world_size)
            if args.output_dir:
                print(config.run.output_dir)
            return 0
        plan = plan_ranks(config, env.world_size)
        finished = finished_run(config)  # before anything is written: a finished run is never retrained
    except (ConfigError, TopologyError) as error:
        if env.rank == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        else:  # the launcher stops every rank once one exits: let rank 0 say why first
            time.sleep(ERROR_GRACE_S)
        return 2
    if finished:
        if env.rank == 0:
            print(finished)
        return 0

    torch.set_num_threads(config.trainer.num_threads or env.cpu_threads(os.cpu_count() or 1))

    # Imported late: DeepSpeed and transformers take seconds to import, config errors should not wait.
    from fusion.sources.engine import SourceEngine
    from fusion.trainer import Interrupted, Trainer

    # SIGUSR1 (e.g. `sbatch --signal=USR1@300` before the time limit) asks the trainer to checkpoint and stop;
    # it would end a source rank, which has nothing to save.
    signal.signal(STOP_SIGNAL, signal.SIG_IGN)
    backend = default_backend()
    topology = init_topology(plan, env, backend, timeout_s=config.topology.startup_timeout_s,
                             trainer_timeout_s=config.topology.collective_timeout_s)
    init_deepspeed_comm(topology, backend)
    if not topology.is_trainer:
        end_when_training_ends(topology, config.topology.finish_grace_s)
        return serve_source(SourceEngine(config, topology), config)
    trainer = Trainer(config, topology)
    signal.signal(STOP_SIGNAL, lambda *_: setattr(trainer, "stop_requested", True))
    try:
        trainer.setup()
        result = trainer.train()
    except Interrupted as stopped:
        if topology.is_logging_rank:
            print(f"interrupted: {stopped}; run the same command again to resume", file=sys.stderr, flush=True)
        return INTERRUPTED
    except ConfigError as error:  # found only once the data or models are open: the same on every trainer rank
        if topology.is_logging_rank:
            print(f"error: {error}", file=sys.stderr, flush=True)
        else:
            time.sleep(ERROR_GRACE_S)
        return 2
    except Exception:
        report_failure(topology, config, f"trainer rank {topology.dp_rank}", "the source groups were told to stop")
        return 1
    finally:
        trainer.cleanup()
        if topology.is_logging_rank and len(topology.plan.roles) > 1:
            release_source_ranks(topology)
        shutdown()
    if topology.is_logging_rank:
        print_summary(result)
    return 0


def end_when_training_ends(topology, grace_s: float) -> None:
    """A source rank still running ``grace_s`` after training ended (hung, or stopped and continued)
    ends itself: with 0 once the trainer said training is over, with 1 if the trainer vanished
    without saying so. A source that stops normally exits long before."""
    def watch() -> None:
        while True:
            time.sleep(WATCH_S)
            try:
                finished = topology.run_finished()
            except RuntimeError:  # the store went with trainer rank 0
                finished = None
            if finished is not False:
                time.sleep(grace_s)
                news = "training ended" if finished else "the trainer vanished (its store closed)"
                print(f"source rank {topology.global_rank} ({topology.role.name}): {news} {grace_s:g} s ago and this rank "
                      "had not stopped; it ends now", file=sys.stderr, flush=True)
                os._exit(0 if finished else 1)

    threading.Thread(target=watch, name="end-when-training-ends", daemon=True).start()


def release_source_ranks(topology) -> None:
    """Say training is over, and wake any stopped source process on this host so that it can end."""
    topology.announce_finished()
    for rank, pid in topology.local_processes().items():
        if topology.plan.role_of(rank).name != topology.role.name:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGCONT)
    time.sleep(2 * WATCH_S)  # the store lives in this process: let every watcher read the news first


def report_failure(topology, config, who: str, consequence: str) -> None:
    """The failure being handled, as one line on stderr from the first rank of the run that failed, and
    its traceback in ``<output_dir>/logs/error-rank<global rank>.txt`` of every failing rank."""
    error = sys.exc_info()[1]
    log = Path(config.run.output_dir) / "logs" / f"error-rank{topology.global_rank}.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(traceback.format_exc())
    if topology.first_failure():
        cause = (str(error).strip().splitlines() or [""])[0]
        print(f"error: {who} failed: {type(error).__name__}: {cause} (traceback in {log}); {consequence}",
              file=sys.stderr, flush=True)


def serve_source(engine, config) -> int:
    """A source rank: load the model, serve until the trainer is done."""
    topology = engine.topology
    try:
        engine.load()
        served = engine.run()
    except Exception:
        report_failure(topology, config, f"source rank {topology.global_rank} ({topology.role.name})",
                       "its replica is lost to the run")
        return 1
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
        print(f"\n  {'source':<24}{'requests':>9}{'sequences':>10}{'latency':>9}{'waited':>8}{'wait%':>6}{'fail':>5}  "
              + "".join(f"{domain[:11]:>12}" for domain in domains) + "   (selection rate per domain)")
        for name, entry in result.sources.items():
            latency = entry["compute_s"] / max(entry["requests"], 1)
            rates = "".join(f"{result.routing[domain][name]['selection_rate']:>12.2f}" for domain in domains)
            state = "  DOWN" if entry["down"] else ""
            print(f"  {name:<24}{entry['requests']:>9}{entry['sequences']:>10}{latency:>8.2f}s{entry['waited_s']:>7.1f}s"
                  f"{100 * entry['wait_share']:>5.0f}%{entry['failures']:>5}  {rates}{state}")
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
