"""Train the target on one run config.

    deepspeed --num_gpus N launch/train.py --config configs/demo.yaml [--set trainer.lr=1e-4 ...]

The config is read and validated, and the world size checked against its topology, before
any process group opens or any model loads.
"""
import argparse
import os
import sys

import torch

from fusion.config import ConfigError, load_config
from fusion.topology import LaunchEnv, TopologyError, default_backend, init_topology, plan_ranks, shutdown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run YAML, e.g. configs/demo.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set trainer.lr=1e-4 (repeatable)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = parser.parse_args()

    env = LaunchEnv.from_mapping(os.environ)
    try:
        config = load_config(args.config, args.set)
        plan = plan_ranks(config, env.world_size)
    except (ConfigError, TopologyError) as error:
        if env.rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2

    local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(config.trainer.num_threads or max(1, (os.cpu_count() or 1) // local_ranks))

    # Imported late: DeepSpeed and transformers take seconds to import, config errors should not wait.
    import deepspeed

    from fusion.trainer import Trainer

    backend = default_backend()
    topology = init_topology(plan, env, backend)
    deepspeed.init_distributed(dist_backend=backend)
    trainer = Trainer(config, topology)
    try:
        trainer.setup()
        result = trainer.train()
    except ConfigError as error:  # found only once the data or models are open
        if topology.is_logging_rank:
            print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        trainer.cleanup()
        shutdown()
    if topology.is_logging_rank:
        print(f"\nfinished {result.steps} steps ({result.tokens} tokens) in {result.seconds:.0f} s; "
              f"loss {result.first_loss:.3f} -> {result.final_loss:.3f}")
        for domain, row in result.eval.items():
            print(f"  eval {domain:<12} perplexity {row['perplexity']:8.2f}  bits/byte {row['bits_per_byte']:.3f}")
        print(f"model:       {result.model_dir}")
        print(f"tensorboard: tensorboard --logdir {result.tensorboard_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
