"""The entry points stop bad input with one clear line and exit code 2, before any process group."""
import os
import subprocess
import sys
import time

import pytest
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


@pytest.mark.parametrize("news, code", [("finished", 0), ("store gone", 1)])
def test_a_source_rank_that_never_stops_ends_itself_after_training(tmp_path, news, code):
    """A source rank stuck where no message reaches it (here: sleeping) ends itself once the trainer says
    training is over (exit 0), or once the trainer's store is gone without a word (exit 1)."""
    script = f"""
import sys, time
sys.path.insert(0, {str(ROOT / "launch")!r})
import train

class Role:
    name = "stuck"

class Topology:
    global_rank, role, started = 3, Role(), time.monotonic()

    def run_finished(self):
        if time.monotonic() - self.started < 1.0:
            return False
        if {news!r} == "store gone":
            raise RuntimeError("Connection reset by peer")
        return True

train.end_when_training_ends(Topology(), grace_s=0.5)
time.sleep(60)
sys.exit(5)
"""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == code, result.stderr[-2000:]
    assert time.monotonic() - started < 30
    news = "training ended" if code == 0 else "the trainer vanished (its store closed)"
    assert f"source rank 3 (stuck): {news} 0.5 s ago and this rank had not stopped" in result.stderr
