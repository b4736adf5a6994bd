"""Build the demo's offline assets (tokenizers, corpus, real sources, specialists, target, report).

    python launch/prepare_assets.py [--root assets] [--stages tokenizers corpus ...]

Every stage is cached: a second run only checks that each stage is complete.
"""
import argparse
import os
import sys
from pathlib import Path

import torch

from fusion.assets.build import STAGES, prepare_assets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("assets"), help="asset folder (default: assets)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="stages to build (default: all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for training and evaluation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prepare_assets(args.root, args.seed, args.stages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
