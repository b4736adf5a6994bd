"""Checkpoints through the user's command: the final checkpoint and the finished marker (a rerun changes
nothing), pruning, damaged checkpoints (fallback to the newest complete one) and the source manifest."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT
from experiments.local_runs import single_node_command
from fusion.checkpoints import manifest_differences
from fusion.config import ConfigError, parse_config
from fusion.finished import finished_run, write_finished
from test_train_zero3 import launch, write_config

pytestmark = pytest.mark.distributed
STEPS = {"micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "eval_batches": 1}


def rerun(config: Path, world_size: int, *overrides: str) -> subprocess.CompletedProcess:
    command = single_node_command(ROOT / "launch/train.py", config, world_size)
    for override in overrides:
        command += ["--set", override]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``directory``: its modification time and its bytes."""
    return {str(path.relative_to(directory)): (path.stat().st_mtime_ns, path.read_bytes())
            for path in sorted(directory.rglob("*")) if path.is_file()}


def tags(output_dir: Path) -> list[str]:
    return sorted(path.name for path in (output_dir / "checkpoints").iterdir() if path.is_dir())


def test_a_finished_run_is_not_rerun_and_keep_last_prunes(tmp_path, tiny_target, tiny_corpus):
    """Pruning to keep_last, a rerun that changes no file, a changed config named, and a run stopped after
    its final checkpoint finished by the rerun from that checkpoint."""
    _, output_dir = launch(tmp_path, "done", 1, tiny_target, tiny_corpus, max_steps=5, checkpoint_every=2, keep_last=2, **STEPS)
    # Saved at steps 2, 4 and 5 (the final one); keeping the last 2 leaves 4 and 5.
    assert tags(output_dir) == ["step4", "step5"]
    assert (output_dir / "finished.json").is_file() and (output_dir / "result.json").is_file()
    before = snapshot(output_dir)
    trained = load_file(output_dir / "model" / "model.safetensors")

    again = rerun(tmp_path / "done.yaml", 1)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("holds a finished run of this config (5 steps") == 1
    assert "Traceback" not in again.stdout + again.stderr
    assert snapshot(output_dir) == before

    changed = rerun(tmp_path / "done.yaml", 1, "trainer.max_steps=7", "trainer.lr=1e-3")
    assert changed.returncode == 2, changed.stdout[-3000:] + changed.stderr[-3000:]
    error = [line for line in changed.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "holds a finished run made with another config" in error[0], changed.stderr[-3000:]
    assert "trainer.lr: 0.003 there, 0.001 now" in error[0] and "trainer.max_steps: 5 there, 7 now" in error[0]
    assert snapshot(output_dir) == before

    # Stopped after its final checkpoint but before its model and marker: the rerun only finishes it.
    shutil.rmtree(output_dir / "model")
    for name in ("result.json", "finished.json"):
        (output_dir / name).unlink()
    finish = rerun(tmp_path / "done.yaml", 1)
    assert finish.returncode == 0, finish.stdout[-3000:] + finish.stderr[-3000:]
    assert f"resumed from {output_dir / 'checkpoints'} at step 5" in finish.stdout + finish.stderr
    assert (output_dir / "finished.json").is_file()
    finished = load_file(output_dir / "model" / "model.safetensors")
    for key in trained:
        torch.testing.assert_close(finished[key], trained[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_target, tiny_corpus) -> Path:
    """A finished 2-rank run with checkpoints at steps 2, 4, 6, 8 and 10."""
    root = tmp_path_factory.mktemp("uninterrupted")
    _, output_dir = launch(root, "run", 2, tiny_target, tiny_corpus, max_steps=10, checkpoint_every=2, **STEPS)
    assert tags(output_dir) == ["step10", "step2", "step4", "step6", "step8"]
    return output_dir


def dangling_latest_and_damaged_shards(checkpoints: Path) -> tuple[int, list[str]]:
    """Step 10 gone (``latest`` still names it), a shard of step 8 truncated, one of step 6 missing."""
    shutil.rmtree(checkpoints / "step10")
    truncated = sorted((checkpoints / "step8").glob("*optim_states.pt"))[-1]  # the last rank's
    truncated.write_bytes(truncated.read_bytes()[:truncated.stat().st_size // 2])
    missing = sorted((checkpoints / "step6").glob("*model_states.pt"))[0]
    missing.unlink()
    return 4, ["latest names step10, which does not exist",
               f"checkpoint step8 in {checkpoints} is incomplete: {truncated.name} has {truncated.stat().st_size} bytes",
               f"checkpoint step6 in {checkpoints} is incomplete: {missing.name} is missing"]


def empty_latest_of_an_unrecorded_save(checkpoints: Path) -> tuple[int, list[str]]:
    """Step 10's save killed before it was recorded complete, and ``latest`` emptied (a full disk, or
    an older writer that truncated it in place)."""
    (checkpoints / "latest").write_text("")
    (checkpoints / "step10" / "complete.json").unlink()
    return 8, ["latest is empty", f"checkpoint step10 in {checkpoints} is incomplete: it has no complete.json"]


@pytest.mark.parametrize("damage", [dangling_latest_and_damaged_shards, empty_latest_of_an_unrecorded_save])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_complete_one(tmp_path, uninterrupted, damage):
    """The run, unfinished (marker, result and model gone) with its newest checkpoints damaged, resumes
    from the newest complete one and ends with the uninterrupted run's weights."""
    output_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, output_dir, ignore=shutil.ignore_patterns("model", "result.json", "finished.json"))
    config = yaml.safe_load((uninterrupted.parent / "run.yaml").read_text())
    config["run"]["output_dir"] = str(output_dir)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    step, warnings = damage(output_dir / "checkpoints")

    result = rerun(tmp_path / "run.yaml", 2)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert f"resumed from {output_dir / 'checkpoints'} at step {step}" in log
    for warning in [*warnings, f"resuming from step{step}, the newest complete checkpoint"]:
        assert f"warning: {warning}" in log or f"warning: {output_dir / 'checkpoints'}/{warning}" in log, (warning, log[-4000:])
    assert "Traceback" not in log, log[-4000:]
    reference, resumed = (load_file(run / "model" / "model.safetensors") for run in (uninterrupted, output_dir))
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)
    assert (output_dir / "finished.json").is_file()
    assert all((output_dir / "checkpoints" / tag / "complete.json").is_file() for tag in tags(output_dir))


def test_a_changed_source_list_on_resume_is_a_named_error(tmp_path, tiny_target, tiny_sources, tiny_corpus):
    sources = [{"name": path.name, "path": str(path)} for path in tiny_sources]
    _, output_dir = launch(tmp_path, "fused", 1, tiny_target, tiny_corpus, sources=sources, fusion={"mode": "all_uniform"},
                           max_steps=2, checkpoint_every=1, **STEPS)
    (output_dir / "finished.json").unlink()  # as if it had been stopped after its last checkpoint
    config = write_config(tmp_path, "fused", 1, tiny_target, tiny_corpus, sources=sources[:1], fusion={"mode": "all_uniform"},
                          max_steps=4, checkpoint_every=1, **STEPS)
    kept = {name: content for name, content in snapshot(output_dir).items() if not name.startswith("tensorboard")}

    result = rerun(config, 1)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, result.stderr[-3000:]
    assert f"trainer.resume: the checkpoint in {output_dir / 'checkpoints' / 'step2'} was made with sources [bpe, wordpiece], " \
           "this run has [bpe]" in error[0]
    assert {name: content for name, content in snapshot(output_dir).items() if not name.startswith("tensorboard")} == kept


def test_manifest_differences_name_each_setting():
    saved = {"target": {"path": "t", "tokenizer_sha256": "T"},
             "sources": [{"name": "a", "path": "pa", "tokenizer_sha256": "A"}, {"name": "b", "path": "pb", "tokenizer_sha256": "B"}],
             "vocab_map_version": 1, "fusion": {"mode": "predictive", "top_k": 10, "temperature": 1.0}, "trainer_ranks": 2,
             "data_sha256": "0123456789abcdef", "packing": False}
    assert manifest_differences(saved, saved) == []
    # A checkpoint from before data.packing existed trained on one chunk per row.
    assert manifest_differences({key: value for key, value in saved.items() if key != "packing"}, saved) == []
    assert manifest_differences(saved, {**saved, "packing": True}) == ["data.packing False, this run has True"]
    # Rows of whole chunks (and checkpoints from before pieces existed) against rows of pieces cut to fill them.
    whole = {**saved, "packing": True}
    assert manifest_differences(whole, {**whole, "min_piece_tokens": 16}) == [
        "data.min_piece_tokens (with data.packing) None, this run has 16"]
    current = {**saved, "sources": [saved["sources"][0], {"name": "b", "path": "elsewhere", "tokenizer_sha256": "C"}],
               "fusion": {**saved["fusion"], "top_k": 5}, "data_sha256": "fedcba9876543210"}
    assert manifest_differences(saved, current) == [
        "source 'b' path pb, this run has elsewhere", "source 'b' tokenizer_sha256 B, this run has C",
        "fusion.top_k 10, this run has 5",
        "training data (data.corpus, train_split, domains, max_length, max_train_chunks or the subset seed) with text hash "
        "0123456789ab, this run has fedcba987654"]
    renamed = {**saved, "sources": [saved["sources"][0], {**saved["sources"][1], "name": "c"}], "vocab_map_version": 2}
    assert manifest_differences(saved, renamed) == ["sources [a, b], this run has [a, c]",
                                                    "vocabulary map version 1, this run has 2"]


def test_the_finished_marker_names_changed_keys_and_resume_false_starts_over(tmp_path):
    raw = {"target": "t", "run": {"output_dir": str(tmp_path)}, "trainer": {"max_steps": 5},
           "sources": [{"name": "a", "path": "pa"}], "fusion": {"mode": "min_ce"}}
    config = parse_config(raw, check_paths=False)
    assert finished_run(config) is None
    write_finished(tmp_path, config, 5)
    assert finished_run(config).startswith(f"{tmp_path} holds a finished run of this config (5 steps")
    changed = parse_config({**raw, "sources": [{"name": "a", "path": "pb"}]}, ["trainer.lr=1e-3"], check_paths=False)
    with pytest.raises(ConfigError, match=r"another config \(sources\[0\]\.path: 'pa' there, 'pb' now; "
                                          r"trainer\.lr: 0\.0003 there, 0\.001 now\)"):
        finished_run(changed)
    assert finished_run(parse_config(raw, ["trainer.resume=false"], check_paths=False)) is None
