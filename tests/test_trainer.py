"""One whole ``Trainer`` in one plain process (a world of one rank, no launcher): setup, steps, held-out
eval, save. The process is a fresh interpreter, so that process groups and DeepSpeed's globals neither
leak into nor come from other tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT
from experiments.local_runs import free_port
from fusion.evaluation import evaluate_by_domain

TRAIN = """
import json, sys
from fusion.config import parse_config
from fusion.topology import LaunchEnv, init_deepspeed_comm, init_topology, plan_ranks, shutdown
from fusion.trainer import Trainer

config = parse_config(json.loads(sys.argv[1]))
topology = init_topology(plan_ranks(config, 1), LaunchEnv.from_mapping({"RANK": "0", "WORLD_SIZE": "1",
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": sys.argv[2]}), "gloo")
trainer = Trainer(config, topology)
try:
    init_deepspeed_comm(topology, "gloo")
    trainer.setup()
    result = trainer.train()
finally:
    trainer.cleanup()
    shutdown()
# The rows the eval scored: the first eval_batches x micro_batch_size of every domain.
rows = {domain: trainer.eval_data.filter(lambda r: r["domain"] == domain).select(range(2 * 4))["text"][:] for domain in result.eval}
print("RESULT " + json.dumps({"sources": result.sources, "eval": result.eval, "eval_before": result.eval_before, "rows": rows}))
"""


@pytest.mark.parametrize("packing", [False, True])
def test_trainer_runs_in_one_process_and_its_eval_matches_launch_evaluate(tmp_path, tiny_target, tiny_sources, tiny_corpus, packing):
    config = {
        "target": str(tiny_target),
        "run": {"output_dir": str(tmp_path / "run"), "seed": 3, "cache_dir": str(tmp_path / "cache")},
        "sources": [{"name": path.name, "path": str(path), "batch_size": 3} for path in tiny_sources],
        "data": {"corpus": str(tiny_corpus), "max_length": 48, "packing": packing},
        "trainer": {"deepspeed_config": str(ROOT / "ds_configs/zero3.json"), "micro_batch_size": 4, "max_steps": 4,
                    "lr": 1e-2, "warmup_steps": 1, "eval_batches": 2, "loss_chunk_size": 37, "log_every": 1,
                    "num_threads": 1},
        "fusion": {"mode": "predictive"},
        "selector": {"max_sources": 1, "exploration": {"start": 0.5, "end": 0.5, "decay_steps": 4}},
    }
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    process = subprocess.run([sys.executable, "-c", TRAIN, json.dumps(config), str(free_port())], capture_output=True,
                             text=True, timeout=600, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)})
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    result = json.loads(next(line for line in process.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])

    output_dir = tmp_path / "run"
    assert json.loads((output_dir / "result.json").read_text())["steps"] == 4
    assert (output_dir / "selector.pt").is_file()
    assert set(result["sources"]) == {"bpe", "wordpiece"}
    # Every sequence asked at least one source, and the asked ones answered.
    asked = sum(entry["sequences"] for entry in result["sources"].values())
    assert asked >= 4 * 4 and all(entry["failures"] == 0 for entry in result["sources"].values())
    assert result["eval_before"].keys() == result["eval"].keys() == {"animals", "colours", "numbers"}
    assert any(result["eval"][d]["bits_per_byte"] != result["eval_before"][d]["bits_per_byte"] for d in result["eval"])

    # The trainer's periodic eval and launch/evaluate.py's scoring agree on the same model and chunks.
    model = AutoModelForCausalLM.from_pretrained(output_dir / "model", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir / "model")
    for domain, row in result["eval"].items():
        texts = result["rows"][domain]
        reference = evaluate_by_domain(model, tokenizer, texts, [domain] * len(texts), 4, 48)[domain]
        assert reference.tokens == row["tokens"]
        assert reference.bits_per_byte == pytest.approx(row["bits_per_byte"], rel=1e-5)
        assert reference.perplexity == pytest.approx(row["perplexity"], rel=1e-5)
