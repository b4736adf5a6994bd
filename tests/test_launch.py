"""The entry points stop bad input with one clear line and exit code 2, before any process group."""
import os
import subprocess
import sys

import yaml

from conftest import ROOT
from experiments.local_runs import free_port


def run_train(tmp_path, config: dict, env: dict | None = None) -> subprocess.CompletedProcess:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config", str(path)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**os.environ, **(env or {})})


def valid_config(tiny_target, tiny_corpus) -> dict:
    return {"target": str(tiny_target), "data": {"corpus": str(tiny_corpus)},
            "trainer": {"deepspeed_config": str(ROOT / "ds_configs/zero3.json")}, "topology": {"trainer_ranks": 2}}


def test_config_typo_is_one_line_naming_the_key(tmp_path, tiny_target, tiny_corpus):
    config = valid_config(tiny_target, tiny_corpus)
    config["trainer"]["learning_rate"] = 1e-3
    result = run_train(tmp_path, config)
    assert result.returncode == 2
    assert result.stderr.startswith("error: trainer.learning_rate: unknown key")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_world_size_mismatch_shows_the_expected_layout(tmp_path, tiny_target, tiny_corpus):
    result = run_train(tmp_path, valid_config(tiny_target, tiny_corpus), env={"WORLD_SIZE": "3", "RANK": "0"})
    assert result.returncode == 2
    assert "the launcher started 3 rank(s) but the config's topology needs 2" in result.stderr
    assert "trainer          ranks [0, 1]" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_data_split_is_named_after_start(tmp_path, tiny_target, tiny_corpus):
    config = valid_config(tiny_target, tiny_corpus)
    config["topology"]["trainer_ranks"] = 1
    config["data"]["eval_split"] = "dev"
    result = run_train(tmp_path, config, env={"WORLD_SIZE": "1", "RANK": "0", "MASTER_PORT": str(free_port())})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: data.eval_split / data.domains: split 'dev' is not in" in result.stderr
    assert "Traceback" not in result.stderr
