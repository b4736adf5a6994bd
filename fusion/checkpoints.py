"""A run's checkpoints and what they were made with (the marker of a finished run: ``fusion.finished``).

Layout under ``run.output_dir``::

    checkpoints/step<N>/                ZeRO-3 shards of every trainer rank, optimizer, schedule, loop state
    checkpoints/step<N>/complete.json   written last, once every rank's save returned: the step, the size
                                        of every file of the checkpoint, and the run's manifest
    checkpoints/latest                  the newest complete tag, replaced atomically after its record
                                        (DeepSpeed's pointer, read by zero_to_fp32 and launch/evaluate.py)

A checkpoint is *complete* when its record exists and every file it lists has the size written.
Resuming takes the newest checkpoint complete on every trainer rank, agreed by a collective
before DeepSpeed reads a byte, so a truncated or missing shard or an empty or dangling
``latest`` (a kill during a save, a full disk) falls back to the previous checkpoint with a
warning and ranks never disagree mid-load. The trainer ranks must share the checkpoint folder's
filesystem (as DeepSpeed itself assumes).

The manifest names what a checkpoint's training depended on beyond its weights (sources, model
paths, tokenizer hashes, vocabulary-map version, top-k, temperature, mode, training data); a
resume with other ones is a ``ConfigError`` naming every difference.
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch.distributed as dist

from fusion import vocab_map
from fusion.config import Config, ConfigError
from fusion.sources.store import corpus_sha256, write_atomic

RECORD = "complete.json"
LATEST = "latest"
_TAG = re.compile(r"^step(\d+)$")


def tag_of(step: int) -> str:
    return f"step{step}"


def run_manifest(config: Config, tokenizers: Sequence, train_chunks) -> dict:
    """The manifest of a run: ``tokenizers`` are the target's then each source's
    (:func:`fusion.splits.run_tokenizers`), ``train_chunks`` the chunks it trains on, in order."""
    target_tokenizer, *source_tokenizers = tokenizers[:1 + len(config.sources)]
    return {
        "target": {"path": config.target, "tokenizer_sha256": vocab_map.tokenizer_sha256(target_tokenizer)},
        "sources": [{"name": source.name, "path": source.path, "tokenizer_sha256": vocab_map.tokenizer_sha256(tokenizer)}
                    for source, tokenizer in zip(config.sources, source_tokenizers)],
        "vocab_map_version": vocab_map.ALGORITHM_VERSION,
        "fusion": {"mode": config.fusion.mode, "top_k": config.fusion.top_k, "temperature": config.fusion.temperature},
        "trainer_ranks": config.topology.trainer_ranks,
        "data_sha256": corpus_sha256(train_chunks),
        "packing": config.data.packing,  # the same chunks in other rows: another data order
        # Other pieces: other documents (null: whole chunks, as without packing)
        "min_piece_tokens": config.data.min_piece_tokens if config.data.packing else None,
    }


def manifest_differences(saved: dict, current: dict) -> list[str]:
    """What differs between a checkpoint's manifest and this run's, one phrase each
    (``"<what> <saved value>, this run has <current value>"``)."""
    differences = []

    def differ(what: str, old, new) -> None:
        if old != new:
            differences.append(f"{what} {old}, this run has {new}")

    old_names, new_names = ([source["name"] for source in manifest["sources"]] for manifest in (saved, current))
    differ("sources", f"[{', '.join(old_names)}]", f"[{', '.join(new_names)}]")
    if old_names == new_names:
        for old, new in zip(saved["sources"], current["sources"]):
            for key in ("path", "tokenizer_sha256"):
                differ(f"source {old['name']!r} {key}", old[key], new[key])
    for key in ("path", "tokenizer_sha256"):
        differ(f"target {key}", saved["target"][key], current["target"][key])
    differ("vocabulary map version", saved["vocab_map_version"], current["vocab_map_version"])
    for key, value in saved["fusion"].items():
        differ(f"fusion.{key}", value, current["fusion"][key])
    differ("topology.trainer_ranks", saved["trainer_ranks"], current["trainer_ranks"])
    differ("data.packing", saved.get("packing", False), current["packing"])
    differ("data.min_piece_tokens (with data.packing)", saved.get("min_piece_tokens"), current.get("min_piece_tokens"))
    differ("training data (data.corpus, train_split, domains, max_length, max_train_chunks or the subset seed) "
           "with text hash", saved["data_sha256"][:12], current["data_sha256"][:12])
    return differences


def problem(tag_dir: Path) -> str | None:
    """Why the checkpoint in ``tag_dir`` is incomplete, or None when it is complete."""
    try:
        record = json.loads((tag_dir / RECORD).read_text())
        files, _ = record["files"], record["manifest"]
    except FileNotFoundError:
        return f"it has no {RECORD} (its save did not finish)"
    except (ValueError, KeyError, TypeError):
        return f"its {RECORD} is unreadable"
    for name, size in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


class Checkpoints:
    """The checkpoints of one run in ``directory`` (a collective object: every trainer rank makes one).

    Args:
        directory: ``<output_dir>/checkpoints``.
        manifest: this run's :func:`run_manifest`, stored in every checkpoint and checked on resume.
        keep_last: complete checkpoints kept after each save (None: all).
        writer: whether this rank writes records and deletes folders (one rank).
        group, size: the trainer ranks' process group and their number.
        info: where the writer's messages go (warnings start with ``warning:``).
    """

    def __init__(self, directory: Path, manifest: dict, keep_last: int | None, writer: bool, group, size: int,
                 info: Callable[[str], None]):
        self.directory, self.manifest, self.keep_last = Path(directory), manifest, keep_last
        self.writer, self.group, self.size, self.info = writer, group, size, info

    def _tags(self) -> dict[int, Path]:
        if not self.directory.is_dir():
            return {}
        return {int(match.group(1)): path for path in self.directory.iterdir()
                if path.is_dir() and (match := _TAG.match(path.name))}

    def _barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)

    def save(self, target, step: int, state: dict) -> None:
        """Save ``target`` (a :class:`fusion.target.TargetModel`) and ``state`` as ``step<step>``, record it
        complete once every rank's save returned, then prune to ``keep_last``."""
        tag_dir = self.directory / tag_of(step)
        if self.writer:  # an older checkpoint of this step is about to be overwritten: no longer complete
            (tag_dir / RECORD).unlink(missing_ok=True)
        self._barrier()
        target.save_checkpoint(self.directory, tag_of(step), state)
        self._barrier()
        if not self.writer:
            return
        files = {str(path.relative_to(tag_dir)): path.stat().st_size for path in sorted(tag_dir.rglob("*"))
                 if path.is_file() and path.name != RECORD}
        record = {"step": step, "files": files, "manifest": self.manifest}
        write_atomic(tag_dir / RECORD, (json.dumps(record, indent=2) + "\n").encode("utf-8"))
        write_atomic(self.directory / LATEST, tag_of(step).encode("utf-8"))
        if self.keep_last is not None:
            complete = sorted(other for other, path in self._tags().items() if other <= step and problem(path) is None)
            kept = set(complete[-self.keep_last:]) | {step}
            for other, path in self._tags().items():
                if other < step and other not in kept:
                    _remove(path)

    def resume_step(self, resume: bool, max_steps: int) -> int | None:
        """The step to resume from (a collective): the newest complete checkpoint's; None to start over
        (``resume`` false, which removes the old checkpoints, or no complete checkpoint).

        Raises:
            ConfigError: see :meth:`newest_complete`; or that checkpoint is past ``max_steps``.
        """
        if not resume:
            self.clear()
            return None
        step = self.newest_complete()
        if step is not None and step > max_steps:
            raise ConfigError(f"trainer.max_steps: the checkpoint in {self.directory} is already at step {step}; "
                              "raise max_steps, or set trainer.resume=false (or another run.output_dir) to start over")
        return step

    def newest_complete(self) -> int | None:
        """The step of the newest checkpoint complete on every trainer rank, None when there is none
        (a collective). Newer incomplete ones and a ``latest`` that does not name it are warned about.

        Raises:
            ConfigError: the trainer ranks see no common complete checkpoint but some see one (no
                shared filesystem), or the checkpoint was made with another manifest.
        """
        tags = self._tags()
        problems = {step: problem(path) for step, path in sorted(tags.items())}
        complete = [step for step, reason in problems.items() if reason is None]
        seen = [complete]
        if self.size > 1:
            seen = [None] * self.size
            dist.all_gather_object(seen, complete, group=self.group)
        common = set.intersection(*(set(steps) for steps in seen))
        if not common and any(seen):
            raise ConfigError(f"trainer.resume: the trainer ranks see different checkpoints in {self.directory} "
                              f"(complete ones per rank: {seen}); put run.output_dir on a filesystem every trainer rank shares")
        step = max(common, default=None)
        warnings = [f"checkpoint {tag_of(other)} in {self.directory} is incomplete: {reason}"
                    for other, reason in problems.items() if reason is not None and (step is None or other > step)]
        if step is not None:
            warnings += self._latest_problems(step)
        for warning in warnings:
            self.info(f"warning: {warning}")
        if step is None:
            if tags:
                self.info(f"warning: no complete checkpoint in {self.directory}; starting from step 0")
            return None
        if warnings:
            self.info(f"warning: resuming from {tag_of(step)}, the newest complete checkpoint")
        saved = json.loads((tags[step] / RECORD).read_text())["manifest"]
        differences = manifest_differences(saved, self.manifest)
        if differences:
            raise ConfigError(f"trainer.resume: the checkpoint in {tags[step]} was made with {'; with '.join(differences)}; "
                              "restore those settings, or set trainer.resume=false (or another run.output_dir) to start over")
        return step

    def _latest_problems(self, step: int) -> list[str]:
        """What is wrong with DeepSpeed's ``latest`` when the newest complete checkpoint is ``step``."""
        latest = self.directory / LATEST
        named = latest.read_text().strip() if latest.is_file() else None
        if not named:
            return [f"{latest} is {'empty' if named == '' else 'missing'}"]
        if not (self.directory / named).is_dir():
            return [f"{latest} names {named}, which does not exist"]
        return [] if named == tag_of(step) else [f"{latest} names {named}, which is not complete"]

    def load(self, target, step: int) -> dict:
        """Load checkpoint ``step`` into ``target``; returns the loop's state saved with it."""
        return target.load_checkpoint(self.directory, tag_of(step))

    def clear(self) -> None:
        """Remove every checkpoint (starting over: a later resume must not find the abandoned ones)."""
        tags = self._tags()
        if self.writer and tags:
            for path in tags.values():
                _remove(path)
            (self.directory / LATEST).unlink(missing_ok=True)
            self.info(f"trainer.resume is false: removed the {len(tags)} checkpoint(s) of the previous run in {self.directory}")


def _remove(tag_dir: Path) -> None:
    (tag_dir / RECORD).unlink(missing_ok=True)  # first: a folder half deleted is never taken for complete
    shutil.rmtree(tag_dir)
