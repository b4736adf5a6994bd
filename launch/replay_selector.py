"""Replay the ``predictive`` selector of a comparison over its precomputed answers, without training
the target (``experiments.selector_replay``): per seed the source tokens and, per held-out domain,
the share of its chunks for which the domain's best source runs; JSON to ``--out`` and stdout.

    python launch/replay_selector.py --comparison runs/cmp --seeds 4 5 6 \
        [--set selector.embedding_dim=256 ...] [--out runs/cmp/replay.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from experiments.selector_replay import replay_comparison  # noqa: E402
from fusion.config import ConfigError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description="Replay a comparison's predictive selector over its answers.")
    parser.add_argument("--comparison", required=True, type=Path, help="a launch/compare.py --out folder")
    parser.add_argument("--seeds", nargs="+", type=int, default=[4, 5, 6])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: <comparison>/replay.json)")
    args = parser.parse_args()
    for name in ("base.yaml", "truth.json"):
        if not (args.comparison / name).is_file():
            print(f"error: --comparison {args.comparison} has no {name}: run launch/compare.py with --out there first",
                  file=sys.stderr)
            return 2
    torch.set_num_threads(1)
    try:
        result = replay_comparison(args.comparison, args.seeds, args.set, report=lambda run: print(json.dumps(run), flush=True))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = args.out or args.comparison / "replay.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["mean"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
