"""Turn a checkpoint of a training run into a Hugging Face model folder, with the target's tokenizer.

    python launch/export.py runs/demo/checkpoints --out runs/demo/export            # the tag in `latest`
    python launch/export.py runs/demo/checkpoints/step200 --out hf/step200 --dtype bf16
    python launch/export.py runs/demo --tag step100 --out hf/step100

The input is a run's output_dir, its ``checkpoints`` folder or one ``step<N>`` folder in it. The
ZeRO-3 partitions are joined into fp32 weights by DeepSpeed's ``zero_to_fp32`` (the optimizer's
master weights, so nothing is lost to 16-bit training), then saved in ``--dtype``. The architecture
and tokenizer are the run's target (``target`` in ``<output_dir>/config.yaml``, or ``--target``).
Runs on CPU, no process group; needs memory for the full fp32 model twice. The result loads with
``AutoModelForCausalLM.from_pretrained(<out>)``. A missing or damaged checkpoint is one line naming
the path, exit code 2.
"""
import argparse
import sys

from fusion.export import DTYPES, CheckpointError, export_checkpoint, resolve_checkpoint, run_target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="<output_dir>, <output_dir>/checkpoints or <output_dir>/checkpoints/step<N>")
    parser.add_argument("--out", required=True, help="new Hugging Face folder to write (must not exist or be empty)")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. step200 (default: the one in `latest`)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype of the saved model")
    parser.add_argument("--target", default=None, help="the run's target HF folder (default: from <output_dir>/config.yaml)")
    args = parser.parse_args(argv)
    try:
        root, tag = resolve_checkpoint(args.checkpoint, args.tag)
        target = args.target or run_target(root)
        out = export_checkpoint(root, target, args.out, DTYPES[args.dtype], tag=tag)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {root / tag} ({args.dtype}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
