"""Real multi-rank ZeRO-3 runs on CPU (gloo) through the user's command: `deepspeed launch/train.py`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT
from experiments.local_runs import single_node_command

pytestmark = pytest.mark.distributed


def write_config(tmp_path: Path, name: str, ranks: int, target: Path, corpus: Path, fusion: dict | None = None,
                 sources: list | None = None, selector: dict | None = None, topology: dict | None = None,
                 packing: bool = False, **trainer) -> Path:
    """A run config in ``tmp_path/<name>.yaml`` writing to ``tmp_path/<name>``, one thread per rank."""
    config = {
        "target": str(target),
        "run": {"output_dir": str(tmp_path / name), "seed": 7, "cache_dir": str(tmp_path / "cache")},
        "topology": {"placement": "colocated", "trainer_ranks": ranks, **(topology or {})},
        "data": {"corpus": str(corpus), "max_length": 48, "packing": packing},
        "trainer": {"deepspeed_config": str(ROOT / "ds_configs/zero3.json"), "num_threads": 1, "log_every": 1,
                    "eval_batches": 2, "loss_chunk_size": 37, **trainer},
        "fusion": {"mode": "none", **(fusion or {})},
        "sources": sources or [],
        "selector": selector or {},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(tmp_path: Path, name: str, ranks: int, target: Path, corpus: Path, world_size: int | None = None,
           **settings) -> tuple[subprocess.CompletedProcess, Path]:
    """Run ``deepspeed --num_gpus <world_size or ranks> launch/train.py`` on a fresh config; assert it exits 0."""
    path = write_config(tmp_path, name, ranks, target, corpus, **settings)
    command = single_node_command(ROOT / "launch/train.py", path, world_size or ranks)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result, tmp_path / name


def shared_memory_names() -> set[str]:
    return {path.name for path in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def test_two_rank_zero3_run_learns_and_saves_a_loadable_model(tmp_path, tiny_target, tiny_corpus):
    segments_before = shared_memory_names()
    result, output_dir = launch(tmp_path, "learn", 2, tiny_target, tiny_corpus,
                                micro_batch_size=4, max_steps=30, lr=3e-3, warmup_steps=2, eval_every=15)
    # DeepSpeed's CPU all-reduce made a 69 MB /dev/shm segment per rank; the run released them.
    assert "deepspeed_shm_comm_op built successfully" in result.stdout + result.stderr
    assert shared_memory_names() <= segments_before
    summary = json.loads((output_dir / "result.json").read_text())
    assert summary["final_loss"] < summary["first_loss"] - 1.0, summary
    assert set(summary["eval"]) == set(summary["eval_before"]) == {"animals", "numbers", "colours"}
    for domain, before in summary["eval_before"].items():
        assert summary["eval"][domain]["bits_per_byte"] < before["bits_per_byte"] - 0.1, (domain, summary)
    assert "bits/byte" in result.stdout and " -> " in result.stdout
    assert "tensorboard --logdir" in result.stdout and str(output_dir / "model") in result.stdout
    assert list((output_dir / "tensorboard").glob("events.out.tfevents.*"))

    model = AutoModelForCausalLM.from_pretrained(output_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(output_dir / "model")
    initial = AutoModelForCausalLM.from_pretrained(tiny_target)
    text = "Red green blue yellow black white. Cat dog horse."
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        trained_loss = model(**batch, labels=batch["input_ids"]).loss.item()
        initial_loss = initial(**batch, labels=batch["input_ids"]).loss.item()
    assert trained_loss < initial_loss - 1.0


def test_loss_normalisation_makes_sharding_invisible(tmp_path, tiny_tied_target, tiny_corpus):
    """Same global batch as 2 ranks x 2 rows or 1 rank x 2 micro-batches of 2 rows: same weights."""
    steps = {"max_steps": 3, "lr": 1e-2, "warmup_steps": 1, "grad_clip": 0.0}
    _, sharded = launch(tmp_path, "sharded", 2, tiny_tied_target, tiny_corpus, micro_batch_size=2, **steps)
    _, accumulated = launch(tmp_path, "accumulated", 1, tiny_tied_target, tiny_corpus, micro_batch_size=2,
                            gradient_accumulation_steps=2, **steps)
    first = load_file(sharded / "model" / "model.safetensors")
    second = load_file(accumulated / "model" / "model.safetensors")
    initial = load_file(tiny_tied_target / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        moved = (first[key] - initial[key]).abs().max()
        assert moved > 1e-4, f"{key} did not train"
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-5, msg=key)
    losses = [json.loads((run / "result.json").read_text())["first_loss"] for run in (sharded, accumulated)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize("objective", ["regression", "linucb"])
def test_predictive_fusion_requests_only_chosen_sources(tmp_path, tiny_target, tiny_sources, tiny_corpus, objective):
    sources = [{"name": path.name, "path": str(path), "batch_size": 3} for path in tiny_sources]
    _, output_dir = launch(tmp_path, "predictive", 2, tiny_target, tiny_corpus, sources=sources,
                           fusion={"mode": "predictive", "lam": 0.5},
                           selector={"objective": objective, "max_sources": 1,
                                     "exploration": {"start": 0.0, "end": 0.0, "measure_steps": 0}},
                           micro_batch_size=4, max_steps=6, lr=3e-3, warmup_steps=1)
    summary = json.loads((output_dir / "result.json").read_text())
    routing, served = summary["routing"], summary["sources"]
    assert set(routing) == {"animals", "numbers", "colours"}
    sequences = 6 * 4 * 2  # steps x micro-batch x ranks
    for source in served:
        # Counted at the source: it served exactly the sequences it was chosen for.
        assert served[source]["sequences"] == sum(routing[domain][source]["sequences"] for domain in routing)
        assert 0 < served[source]["sequences"] <= sequences
    # max_sources 1 and no exploration: exactly one source computed each sequence.
    assert sum(entry["sequences"] for entry in served.values()) == sequences
    selector = torch.load(output_dir / "selector.pt", weights_only=False)["selector"]
    if objective == "linucb":
        # The statistics hold every score of both ranks (summed, not averaged): one per sequence.
        assert selector["score_total"][1].item() == sequences


@pytest.mark.parametrize("packing", [False, True])
def test_offline_answers_train_like_live_sources(tmp_path, tiny_target, tiny_sources, tiny_corpus, packing):
    """Answers written by launch/precompute.py give the same step losses as running the sources live,
    on packed rows too (the answers are stored per chunk and placed in the rows)."""
    sources = [{"name": path.name, "path": str(path)} for path in tiny_sources]
    fusion = {"mode": "all_uniform", "lam": 0.5, "answers_dir": str(tmp_path / "answers")}
    steps = {"micro_batch_size": 4, "max_steps": 3, "lr": 1e-3, "warmup_steps": 1, "eval_batches": 1}
    _, live = launch(tmp_path, "live", 1, tiny_target, tiny_corpus, sources=sources, fusion=fusion, packing=packing, **steps)
    config = tmp_path / "live.yaml"
    result = subprocess.run([sys.executable, str(ROOT / "launch/precompute.py"), "--config", str(config), "--no-progress",
                             "--shard-size", "64"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    _, offline = launch(tmp_path, "offline", 1, tiny_target, tiny_corpus, sources=sources,
                        fusion={**fusion, "offline": True}, packing=packing, **steps)
    live_result, offline_result = (json.loads((run / "result.json").read_text()) for run in (live, offline))
    # Stored log-probs are fp16: the soft term agrees to about 1e-3.
    assert offline_result["first_loss"] == pytest.approx(live_result["first_loss"], rel=2e-3)
    assert offline_result["final_loss"] == pytest.approx(live_result["final_loss"], rel=2e-3)
    for name in ("bpe", "wordpiece"):
        # Sources score documents: 3 steps of 4 rows, of one document each, or of several when packed.
        documents = offline_result["sources"][name]["sequences"]
        assert documents == live_result["sources"][name]["sequences"]
        assert documents > 3 * 4 if packing else documents == 3 * 4


@pytest.mark.parametrize("mode", ["scores", "min_ce", "avg_ce"])
def test_every_fusion_mode_trains(tmp_path, tiny_target, tiny_sources, tiny_corpus, mode):
    sources = [{"name": path.name, "path": str(path)} for path in tiny_sources]
    _, output_dir = launch(tmp_path, mode, 1, tiny_target, tiny_corpus, sources=sources, fusion={"mode": mode},
                           micro_batch_size=4, max_steps=2, warmup_steps=1, eval_batches=1)
    summary = json.loads((output_dir / "result.json").read_text())
    weights = {domain: sum(entry["weight"] for entry in row.values()) for domain, row in summary["routing"].items()}
    # Every sequence's fusion weights over the sources sum to one; every source ran on every sequence.
    assert weights == pytest.approx({domain: 1.0 for domain in weights})
    assert all(entry["sequences"] == 2 * 4 for entry in summary["sources"].values())
    assert (output_dir / "selector.pt").is_file() == (mode == "scores")


def kill_at_first_checkpoint_then_resume(config: Path, world_size: int, output_dir: Path) -> None:
    """Start the run, SIGKILL every process once a checkpoint exists, then run the same command to the end."""
    command = single_node_command(ROOT / "launch/train.py", config, world_size)
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (output_dir / "checkpoints" / "latest").is_file():
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and every rank
        process.wait()
    assert not (output_dir / "model").exists(), "the run finished before it was killed"

    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr


@pytest.mark.parametrize("packing", [False, True])
def test_killed_run_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, tiny_target, tiny_corpus, packing):
    steps = {"micro_batch_size": 2, "max_steps": 30, "lr": 3e-3, "warmup_steps": 1, "eval_batches": 1}
    _, uninterrupted = launch(tmp_path, "uninterrupted", 2, tiny_target, tiny_corpus, packing=packing, **steps)

    output_dir = tmp_path / "resumed"
    config = yaml.safe_load((tmp_path / "uninterrupted.yaml").read_text())
    config["run"]["output_dir"] = str(output_dir)
    config["trainer"]["checkpoint_every"] = 4
    (tmp_path / "resumed.yaml").write_text(yaml.safe_dump(config))
    kill_at_first_checkpoint_then_resume(tmp_path / "resumed.yaml", 2, output_dir)
    first = load_file(uninterrupted / "model" / "model.safetensors")
    second = load_file(output_dir / "model" / "model.safetensors")
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-5, msg=key)
    # The resumed run's result covers the whole run, not only its part after the checkpoint.
    whole, resumed = (json.loads((run / "result.json").read_text()) for run in (uninterrupted, output_dir))
    assert resumed["tokens"] == whole["tokens"] and len(resumed["step_seconds"]) == 30
    assert resumed["first_loss"] == pytest.approx(whole["first_loss"], rel=1e-4)
    assert resumed["eval_before"].keys() == whole["eval_before"].keys()
    for domain, row in whole["eval_before"].items():
        assert resumed["eval_before"][domain]["bits_per_byte"] == pytest.approx(row["bits_per_byte"], rel=1e-5)
