"""Disaggregated runs on CPU (gloo): trainer ranks plus one DeepSpeed inference engine group per source."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from experiments.local_runs import free_port
from test_train_zero3 import kill_at_first_checkpoint_then_resume, launch, write_config

pytestmark = pytest.mark.distributed

STEPS = {"micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "eval_batches": 1}


def source_specs(tiny_sources: list[Path], tensor_parallel: dict | None = None, batch_size: int = 3) -> list[dict]:
    return [{"name": path.name, "path": str(path), "batch_size": batch_size,
             "tensor_parallel": (tensor_parallel or {}).get(path.name, 1)} for path in tiny_sources]


def test_disaggregated_sources_train_like_colocated_ones(tmp_path, tiny_target, tiny_sources, tiny_corpus):
    """Same batches and seed: engine groups (one with AutoTP over 2 ranks) give the colocated losses and weights."""
    settings = {"fusion": {"mode": "scores", "lam": 0.5}, "max_steps": 3, **STEPS}
    _, colocated = launch(tmp_path, "colocated", 2, tiny_target, tiny_corpus, sources=source_specs(tiny_sources), **settings)
    # 2 trainer ranks + bpe (tensor_parallel 2) + wordpiece (1 rank) = 5 ranks; requests prefetched one step ahead.
    result, disaggregated = launch(tmp_path, "disaggregated", 2, tiny_target, tiny_corpus, world_size=5,
                                   sources=source_specs(tiny_sources, {"bpe": 2}),
                                   topology={"placement": "disaggregated", "prefetch_steps": 1}, **settings)
    local, remote = (json.loads((run / "result.json").read_text()) for run in (colocated, disaggregated))
    assert remote["first_loss"] == pytest.approx(local["first_loss"], rel=1e-5)
    assert remote["final_loss"] == pytest.approx(local["final_loss"], rel=1e-5)
    first, second = (load_file(run / "model" / "model.safetensors") for run in (colocated, disaggregated))
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-6, msg=key)
    for name in ("bpe", "wordpiece"):
        assert remote["sources"][name]["sequences"] == local["sources"][name]["sequences"] == 3 * 4 * 2
        assert not remote["sources"][name]["down"]
    assert "source bpe replica 0: served" in result.stdout and "waited" in result.stdout


def test_only_chosen_sources_receive_requests(tmp_path, tiny_target, tiny_sources, tiny_corpus):
    """Counted at the sources: each served exactly the sequences the selector sent it, from both trainer
    ranks; the two replicas of one source share its load."""
    steps = 5
    specs = source_specs(tiny_sources, batch_size=2)
    specs[1]["replicas"] = 2
    _, output_dir = launch(tmp_path, "predictive", 2, tiny_target, tiny_corpus, world_size=5,
                           sources=specs, topology={"placement": "disaggregated", "prefetch_steps": 2},
                           fusion={"mode": "predictive", "lam": 0.5},
                           selector={"max_sources": 1, "exploration": {"start": 0.0, "end": 0.0, "measure_steps": 0}}, max_steps=steps, **STEPS)
    summary = json.loads((output_dir / "result.json").read_text())
    routing, sources = summary["routing"], summary["sources"]
    sequences = steps * 4 * 2
    replicas_of = {spec["name"]: spec.get("replicas", 1) for spec in specs}
    served = {name: sum(replica["sequences"] for replica in entry["served"]) for name, entry in sources.items()}
    for name, entry in sources.items():
        chosen = sum(routing[domain][name]["sequences"] for domain in routing)
        assert served[name] == entry["sequences"] == chosen, (name, served, chosen)
        assert len(entry["served"]) == replicas_of[name]
        assert sum(sum(replica["by_trainer_rank"].values()) for replica in entry["served"]) == served[name]
    replicas = sources["wordpiece"]["served"]
    assert len(replicas) == 2 and all(replica["sequences"] > 0 for replica in replicas), replicas
    # max_sources 1, no exploration: exactly one source computed each sequence.
    assert sum(served.values()) == sequences
    assert (output_dir / "selector.pt").is_file()


def test_killed_predictive_run_resumes_to_the_same_choices_and_weights(tmp_path, tiny_target, tiny_sources, tiny_corpus):
    """Killed after a checkpoint, a disaggregated predictive run resumes to the uninterrupted run's routing,
    selector and weights: the choices already made for prefetched steps are replayed, not drawn again
    by a selector that has since learnt more."""
    settings = {"sources": source_specs(tiny_sources), "topology": {"placement": "disaggregated", "prefetch_steps": 2},
                "fusion": {"mode": "predictive", "lam": 0.5}, "max_steps": 12, **STEPS,
                "selector": {"max_sources": 1, "lr": 0.05, "exploration": {"start": 0.5, "end": 0.5}}}
    _, uninterrupted = launch(tmp_path, "uninterrupted", 1, tiny_target, tiny_corpus, world_size=3, **settings)
    config = write_config(tmp_path, "resumed", 1, tiny_target, tiny_corpus, checkpoint_every=4, **settings)
    kill_at_first_checkpoint_then_resume(config, 3, tmp_path / "resumed")

    runs = (uninterrupted, tmp_path / "resumed")
    first, second = (json.loads((run / "result.json").read_text()) for run in runs)
    assert second["routing"] == first["routing"]
    # Source work is counted over the whole run, both parts; the prefetched steps' requests were sent
    # before the kill and are sent again after it (at most prefetch_steps x micro_batch_size more).
    for name, entry in first["sources"].items():
        assert entry["sequences"] <= second["sources"][name]["sequences"] <= entry["sequences"] + 2 * STEPS["micro_batch_size"]
    models = [load_file(run / "model" / "model.safetensors") for run in runs]
    selectors = [torch.load(run / "selector.pt")["selector"] for run in runs]
    for reference, resumed in (models, selectors):
        for key in reference:
            torch.testing.assert_close(resumed[key], reference[key], rtol=1e-4, atol=1e-6, msg=key)


def start_ranks(config: Path, world_size: int, log_dir: Path) -> list[subprocess.Popen]:
    """One process per rank, as a per-node launcher would start them (the single-node `deepspeed`
    launcher kills every rank when one dies, so a dying source is only survivable across nodes)."""
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "LOCAL_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
        log = open(log_dir / f"rank{rank}.log", "w")
        processes.append(subprocess.Popen([sys.executable, str(ROOT / "launch/train.py"), "--config", str(config)],
                                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return processes


def wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout_s: float = 300) -> None:
    """Wait until ``text`` appears in ``log`` while ``process`` runs (fails on its exit or the timeout)."""
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def stop_all(processes) -> None:
    """Kill what is still running of ``processes`` (a test's clean-up)."""
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("mode", ["all_uniform", "scores"])
def test_a_dead_and_a_hung_source_are_marked_down_and_training_finishes(tmp_path, tiny_target, tiny_sources, tiny_corpus, mode):
    sources = source_specs(tiny_sources) + [{"name": "hung", "path": str(tiny_sources[0]), "batch_size": 3}]
    steps = 16
    config = write_config(tmp_path, "failures", 1, tiny_target, tiny_corpus, sources=sources,
                          topology={"placement": "disaggregated", "request_timeout_s": 5, "finish_grace_s": 5},
                          fusion={"mode": mode, "lam": 0.5}, max_steps=steps, **STEPS)
    processes = start_ranks(config, 4, tmp_path)  # trainer, bpe, wordpiece, hung
    trainer, _, wordpiece, hung = processes
    trainer_log = tmp_path / "rank0.log"
    try:
        wait_for_line(trainer_log, f"step 4/{steps}", trainer)
        wordpiece.send_signal(signal.SIGKILL)  # dies: its connection closes
        hung.send_signal(signal.SIGSTOP)  # hangs: only the request timeout finds it
        assert trainer.wait(timeout=300) == 0, trainer_log.read_text()[-4000:]
        assert processes[1].wait(timeout=60) == 0, (tmp_path / "rank1.log").read_text()[-3000:]
        # The stopped source ends too, once training is over (the trainer wakes it): the run ends, and ends well.
        assert hung.wait(timeout=60) == 0, (tmp_path / "rank3.log").read_text()[-3000:]
    finally:
        stop_all(processes)
    summary = json.loads((tmp_path / "failures" / "result.json").read_text())
    entries = summary["sources"]
    assert entries["wordpiece"]["down"] and entries["hung"]["down"] and not entries["bpe"]["down"]
    assert entries["wordpiece"]["failures"] == entries["hung"]["failures"] == 1
    # The dead one is found by its closed connection (at once), the hung one by the request deadline.
    assert "timed out" not in json.dumps(entries["wordpiece"]["down_reasons"])
    assert "timed out after 5 s" in json.dumps(entries["hung"]["down_reasons"])
    assert entries["hung"]["waited_s"] >= 5
    # The live source answered every sequence; the others stopped being asked once down.
    assert entries["bpe"]["sequences"] == steps * 4
    assert 4 * 4 <= entries["wordpiece"]["sequences"] < steps * 4
    assert math.isfinite(summary["final_loss"])
    assert "is down" in trainer_log.read_text()


def test_a_failing_trainer_exits_non_zero_and_stops_the_sources(tmp_path, tiny_target, tiny_sources, tiny_corpus):
    broken = tmp_path / "broken-target"
    shutil.copytree(tiny_target, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    config = write_config(tmp_path, "broken", 1, broken, tiny_corpus, sources=source_specs(tiny_sources[:1]),
                          topology={"placement": "disaggregated"}, fusion={"mode": "all_uniform"}, max_steps=2, **STEPS)
    trainer, source = start_ranks(config, 2, tmp_path)
    try:
        assert trainer.wait(timeout=300) == 1
        assert source.wait(timeout=120) == 0, (tmp_path / "rank1.log").read_text()[-3000:]
    finally:
        stop_all((trainer, source))
    assert "error: trainer rank 0 failed" in (tmp_path / "rank0.log").read_text()


def test_a_hung_trainer_rank_ends_the_run_after_the_collective_timeout(tmp_path, tiny_target, tiny_corpus):
    config = write_config(tmp_path, "hung-trainer", 2, tiny_target, tiny_corpus, topology={"collective_timeout_s": 10},
                          max_steps=400, **STEPS)
    first, second = start_ranks(config, 2, tmp_path)
    try:
        wait_for_line(tmp_path / "rank0.log", "step 2/400", first)
        second.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        assert first.wait(timeout=120) == 1
        assert time.monotonic() - stopped < 60
        assert "error: trainer rank 0 failed" in (tmp_path / "rank0.log").read_text()
    finally:
        stop_all((first, second))


def test_sigusr1_saves_a_checkpoint_and_stops_then_the_same_command_resumes(tmp_path, tiny_target, tiny_corpus):
    config = write_config(tmp_path, "interrupted", 2, tiny_target, tiny_corpus, max_steps=400, **STEPS)
    first, second = start_ranks(config, 2, tmp_path)
    try:
        wait_for_line(tmp_path / "rank0.log", "step 3/400", first)
        second.send_signal(signal.SIGUSR1)  # one rank is asked: both stop at the same step
        assert first.wait(timeout=120) == 3 and second.wait(timeout=120) == 3, (tmp_path / "rank0.log").read_text()[-3000:]
    finally:
        stop_all((first, second))
    log = (tmp_path / "rank0.log").read_text()
    assert "interrupted: stopped on request after step" in log and "run the same command again to resume" in log
    step = int(log.split("stopped on request after step ")[1].split(";")[0])
    assert 3 <= step < 400
    output_dir = tmp_path / "interrupted"
    assert (output_dir / "checkpoints" / "latest").read_text().strip() == f"step{step}"
    assert not (output_dir / "result.json").exists()
    # The same command resumes from there (a short remainder: fewer steps to go).
    resumed = write_config(tmp_path, "interrupted", 2, tiny_target, tiny_corpus, max_steps=step + 2, **STEPS)
    for process in start_ranks(resumed, 2, tmp_path):
        assert process.wait(timeout=300) == 0, (tmp_path / "rank0.log").read_text()[-3000:]
    assert f"resumed from {output_dir / 'checkpoints'} at step {step}" in (tmp_path / "rank0.log").read_text()
    assert json.loads((output_dir / "result.json").read_text())["steps"] == step + 2
