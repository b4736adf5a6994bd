"""One whole ``Trainer`` in this process (a world of one rank): setup, steps, held-out eval, save."""
from __future__ import annotations

import gc
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT
from experiments.local_runs import free_port
from fusion.config import parse_config
from fusion.evaluation import evaluate_by_domain
from fusion.topology import LaunchEnv, init_deepspeed_comm, init_topology, plan_ranks, shutdown
from fusion.trainer import Trainer


@pytest.fixture
def one_rank_world(monkeypatch):
    """The launcher's variables of a one-rank run (restored afterwards; init_topology rewrites them)."""
    port = free_port()
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    return LaunchEnv.from_mapping({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def test_trainer_runs_in_one_process_and_its_eval_matches_launch_evaluate(tmp_path, tiny_target, tiny_sources, tiny_corpus,
                                                                          one_rank_world):
    config = parse_config({
        "target": str(tiny_target),
        "run": {"output_dir": str(tmp_path / "run"), "seed": 3, "cache_dir": str(tmp_path / "cache")},
        "sources": [{"name": path.name, "path": str(path), "batch_size": 3} for path in tiny_sources],
        "data": {"corpus": str(tiny_corpus), "max_length": 48},
        "trainer": {"deepspeed_config": str(ROOT / "ds_configs/zero3.json"), "micro_batch_size": 4, "max_steps": 4,
                    "lr": 1e-2, "warmup_steps": 1, "eval_batches": 2, "loss_chunk_size": 37, "log_every": 1},
        "fusion": {"mode": "predictive"},
        "selector": {"max_sources": 1, "exploration": {"start": 0.5, "end": 0.5, "decay_steps": 4}},
    })
    topology = init_topology(plan_ranks(config, 1), one_rank_world, "gloo")
    trainer = Trainer(config, topology)
    try:
        init_deepspeed_comm(topology, "gloo")
        trainer.setup()
        result = trainer.train()
    finally:
        trainer.cleanup()
        shutdown()

    output_dir = tmp_path / "run"
    assert json.loads((output_dir / "result.json").read_text())["steps"] == 4
    assert (output_dir / "selector.pt").is_file()
    assert set(result.sources) == {"bpe", "wordpiece"}
    # Every sequence asked at least one source, and the asked ones answered.
    asked = sum(entry["sequences"] for entry in result.sources.values())
    assert asked >= 4 * 4 and all(entry["failures"] == 0 for entry in result.sources.values())
    assert result.eval_before.keys() == result.eval.keys() == {"animals", "colours", "numbers"}
    assert any(result.eval[d]["bits_per_byte"] != result.eval_before[d]["bits_per_byte"] for d in result.eval)

    # The trainer's periodic eval and launch/evaluate.py's scoring agree on the same model and chunks:
    # the first eval_batches x micro_batch_size eval rows of every domain.
    eval_rows = {domain: trainer.eval_data.filter(lambda r: r["domain"] == domain).select(range(2 * 4)) for domain in result.eval}
    del trainer  # and with it the ZeRO-3 settings that from_pretrained would otherwise follow
    gc.collect()
    model = AutoModelForCausalLM.from_pretrained(output_dir / "model", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir / "model")
    for domain, row in result.eval.items():
        rows = eval_rows[domain]
        reference = evaluate_by_domain(model, tokenizer, rows["text"], rows["domain"], 4, 48)[domain]
        assert reference.tokens == row["tokens"]
        assert reference.bits_per_byte == pytest.approx(row["bits_per_byte"], rel=1e-5)
        assert reference.perplexity == pytest.approx(row["perplexity"], rel=1e-5)
