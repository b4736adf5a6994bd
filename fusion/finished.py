"""The marker of a finished run: ``<output_dir>/finished.json``, written after ``result.json`` and the
model, holding the run's config.

Rerunning a finished run's command finds it before anything is written (``launch/train.py``, on
every rank, reading files only) and changes nothing; the same command with another config is a
``ConfigError`` naming every changed key. Deleting the marker lets the run continue from its
final checkpoint with the new config; ``trainer.resume: false`` starts over whatever is there.
"""
from __future__ import annotations

import json
from pathlib import Path

from fusion.config import Config, ConfigError

FINISHED = "finished.json"


def write_finished(output_dir: Path, config: Config, steps: int) -> None:
    """Mark ``output_dir`` as a finished run of ``config`` (after its result and model are written)."""
    path = Path(output_dir) / FINISHED
    partial = path.with_name(f".{FINISHED}.partial")
    partial.write_text(json.dumps({"steps": steps, "config": config.to_dict()}, indent=2) + "\n")
    partial.replace(path)  # atomic: a marker that exists is whole


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {key: item for name, child in value.items() for key, item in _flat(child, f"{prefix}.{name}" if prefix else name).items()}
    if isinstance(value, list):
        return {key: item for index, child in enumerate(value) for key, item in _flat(child, f"{prefix}[{index}]").items()} or {prefix: []}
    return {prefix: value}


def finished_run(config: Config) -> str | None:
    """The line to print when ``run.output_dir`` holds a finished run of ``config``; None when it holds
    no finished run or ``trainer.resume`` is false (start over). Reads files only (every rank may call it
    before anything starts).

    Raises:
        ConfigError: the finished run was made with another config (every differing key is named).
    """
    output_dir = Path(config.run.output_dir)
    path = output_dir / FINISHED
    if not (config.trainer.resume and path.is_file()):
        return None
    try:
        record = json.loads(path.read_text())
        saved, steps = _flat(record["config"]), record["steps"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"run.output_dir: {path} is unreadable; delete it to finish the run again from its last checkpoint") from None
    current = _flat(json.loads(json.dumps(config.to_dict())))
    changed = [f"{key}: {saved.get(key, '(unset)')!r} there, {current.get(key, '(unset)')!r} now"
               for key in sorted(saved.keys() | current.keys()) if key != "run.output_dir" and saved.get(key) != current.get(key)]
    if changed:
        raise ConfigError(f"run.output_dir: {output_dir} holds a finished run made with another config ({'; '.join(changed)}); "
                          f"use another run.output_dir, or delete {path} to continue that run with this config")
    return (f"{output_dir} holds a finished run of this config ({steps} steps, model in {output_dir / 'model'}); "
            "nothing to do (use another run.output_dir to train again)")
