"""A training run's DeepSpeed ZeRO checkpoint as a Hugging Face model folder.

The trainer saves ``engine.save_checkpoint(<output_dir>/checkpoints, tag="step<N>")``: one folder
per tag holding, for every trainer rank r, ``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` (shapes,
buffers) and ``*zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` (that rank's partition of the fp32
master weights), and a ``latest`` file naming the newest tag. DeepSpeed's ``zero_to_fp32`` joins
the partitions into full fp32 tensors; the engine's module is the trainer's ``TrainModule``, which
holds the target causal LM as ``causal_lm.`` (plus an alias of its LM-head weight).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

PREFIX = "causal_lm."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SHARD = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_(model|optim)_states\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, or does not fit the target; the message names the path."""


def is_checkpoint(path: str | Path) -> bool:
    """A DeepSpeed checkpoint folder (with ``latest``) or one tag folder of it (with model-state shards)."""
    path = Path(path)
    return (path / "latest").is_file() or any(path.glob("*model_states.pt"))


def _tags(root: Path) -> list[str]:
    return sorted((entry.name for entry in root.iterdir() if entry.is_dir() and any(entry.glob("*model_states.pt"))),
                  key=lambda name: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)])


def resolve_checkpoint(path: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """``(checkpoints folder, tag)`` for a run's output_dir, its ``checkpoints`` folder (the tag in
    ``latest`` unless ``tag`` is given) or one tag folder; every rank's shards are checked to be there.

    Raises:
        CheckpointError: no such folder, ``latest`` empty or naming a missing tag, a rank's shard
            missing or empty.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder (give <output_dir>/checkpoints or a step<N> folder in it)")
    if (path / "checkpoints").is_dir() and not is_checkpoint(path):
        path = path / "checkpoints"
    if any(path.glob("*model_states.pt")):
        if tag is not None:
            raise CheckpointError(f"{path} is one checkpoint tag already; drop --tag {tag} or give its parent folder")
        root, tag = path.parent, path.name
    else:
        root = path
        available = _tags(root)
        choose = f"choose one of {available} with --tag" if available else "it holds no checkpoint tag"
        if tag is None:
            latest = root / "latest"
            if not latest.is_file():
                raise CheckpointError(f"{root}: not a DeepSpeed checkpoint (no 'latest' file); {choose}")
            tag = latest.read_text().strip()
            if not tag:
                raise CheckpointError(f"{latest} is empty (an interrupted save?); {choose}")
        if not (root / tag).is_dir():
            raise CheckpointError(f"{root / tag}: no such checkpoint tag; {choose}")
    folder = root / tag
    ranks: dict[str, set[int]] = {"model": set(), "optim": set()}
    for file in folder.iterdir():
        match = _SHARD.search(file.name)
        if match:
            if file.stat().st_size == 0:
                raise CheckpointError(f"{file}: empty shard (an interrupted save?); use an older tag of {root}")
            ranks[match.group(2)].add(int(match.group(1)))
    world = range(max(ranks["model"] | ranks["optim"], default=-1) + 1)
    for kind, found in ranks.items():
        missing = sorted(set(world) - found)
        if not found or missing:
            raise CheckpointError(f"{folder}: the {kind}-state shard of rank(s) {missing or 'all'} is missing; "
                                  f"use another tag of {root} ({_tags(root)})")
    return root, tag


def fp32_state_dict(path: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The causal LM's fp32 weights in a checkpoint (keys as in the HF model's ``state_dict``).

    Raises:
        CheckpointError: see ``resolve_checkpoint``; a shard that cannot be read (truncated, another
            format); no ``causal_lm.`` weights (not a checkpoint of this trainer).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = resolve_checkpoint(path, tag)
    try:
        # Its progress bars go to stdout: the caller's stderr is for its errors.
        with contextlib.redirect_stderr(sys.stdout):
            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    except (RuntimeError, ValueError, KeyError, EOFError, OSError, pickle.UnpicklingError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{root / tag}: damaged checkpoint ({reason}); use an older tag of {root} ({_tags(root)})") from None
    weights = {key[len(PREFIX):]: value for key, value in state.items() if key.startswith(PREFIX)}
    if not weights:
        raise CheckpointError(f"{root / tag}: no '{PREFIX}' weights; not a checkpoint of fusion's trainer")
    return weights


def run_target(checkpoints: str | Path) -> str:
    """The target model of the run whose ``<output_dir>/checkpoints`` folder this is (``target`` in
    ``<output_dir>/config.yaml``).

    Raises:
        CheckpointError: the run's config is not there.
    """
    from fusion.config import ConfigError, load_config

    config_path = Path(checkpoints).parent / "config.yaml"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: no run config next to the checkpoint; pass --target <the target's HF folder>")
    try:
        return load_config(config_path, check_paths=False).target
    except ConfigError as error:
        raise CheckpointError(f"{config_path}: {error}") from None


def export_checkpoint(checkpoint: str | Path, target: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
                      tag: str | None = None) -> Path:
    """Write ``checkpoint``'s weights in ``target``'s architecture, with its tokenizer, to ``out_dir``.

    The folder appears complete or not at all (written next to it, then renamed).

    Raises:
        CheckpointError: see ``fp32_state_dict``; the weights do not fit ``target``; ``out_dir``
            exists and is not empty.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir}: exists and is not empty; choose another output folder or remove it")
    if not (Path(target) / "config.json").is_file():
        raise CheckpointError(f"{target}: not a Hugging Face model folder (no config.json); pass the run's target with --target")
    weights = fp32_state_dict(checkpoint, tag)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    expected = model.state_dict()
    misfits = ([f"{key} missing" for key in expected if key not in weights]
               + [f"{key} unexpected" for key in weights if key not in expected]
               + [f"{key} {tuple(weights[key].shape)} vs {tuple(value.shape)}" for key, value in expected.items()
                  if key in weights and weights[key].shape != value.shape])
    if misfits:
        raise CheckpointError(f"{checkpoint}: the weights do not fit the target {target} ({len(misfits)} tensors, e.g. "
                              f"{'; '.join(misfits[:3])}); pass the run's target with --target")
    model.load_state_dict(weights, strict=True)
    model.to(dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        AutoTokenizer.from_pretrained(target).save_pretrained(staging)
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
