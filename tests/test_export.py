"""launch/export.py on a real ZeRO-3 checkpoint of a 2-rank run: the exported folder loads and generates in a
fresh process and holds the weights the trainer itself saved at that step; damaged checkpoints are one line."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT
from test_train_zero3 import launch

pytestmark = pytest.mark.distributed

# Constant lr after warmup (min_lr_ratio 1): the schedule does not depend on max_steps, so step 3 of a
# 4-step run is the end of a 3-step run with the same seed and data order. (The first two optimizer
# steps run at lr 0: DeepSpeed's warmup starts at ratio 0/1, then 0/warmup_num_steps.)
STEPS = {"micro_batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "min_lr_ratio": 1.0, "eval_batches": 1}
PROMPT = "Red green blue. Cat dog"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tied_target, tiny_corpus) -> dict[str, Path]:
    """``checkpointed``: 3 steps, checkpoints step1..step3 (the last one is the final checkpoint, latest);
    ``reference``: the same run without checkpoints, whose ``model/`` the trainer saved itself (16-bit
    gather; fp32 here)."""
    root = tmp_path_factory.mktemp("export")
    _, checkpointed = launch(root, "checkpointed", 2, tiny_tied_target, tiny_corpus, max_steps=3, checkpoint_every=1, **STEPS)
    _, reference = launch(root, "reference", 2, tiny_tied_target, tiny_corpus, max_steps=3, **STEPS)
    assert (checkpointed / "checkpoints" / "latest").read_text().strip() == "step3"
    return {"checkpointed": checkpointed, "reference": reference, "root": root}


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch/export.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


GENERATE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
batch = tokenizer(sys.argv[2], return_tensors="pt")
with torch.no_grad():
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
print(json.dumps({"ids": out[0].tolist(), "dtype": str(model.dtype)}))
"""


def test_export_loads_and_generates_in_a_fresh_process_with_the_runs_weights(runs, tmp_path, tiny_tied_target):
    out = tmp_path / "fp32"
    result = export(runs["checkpointed"] / "checkpoints", "--out", out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"exported {runs['checkpointed'] / 'checkpoints' / 'step3'}" in result.stdout

    exported = load_file(out / "model.safetensors")
    reference = load_file(runs["reference"] / "model" / "model.safetensors")
    initial = load_file(tiny_tied_target / "model.safetensors")
    assert exported.keys() == reference.keys()
    for key in reference:
        assert exported[key].dtype == torch.float32
        torch.testing.assert_close(exported[key], reference[key], rtol=1e-6, atol=1e-7, msg=key)
    assert max(float((exported[key] - initial[key]).abs().max()) for key in initial) > 1e-3, "exported the untrained target"

    fresh = subprocess.run([sys.executable, "-c", GENERATE, str(out), PROMPT], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    generated = json.loads(fresh.stdout.strip().splitlines()[-1])
    model = AutoModelForCausalLM.from_pretrained(runs["reference"] / "model")
    tokenizer = AutoTokenizer.from_pretrained(runs["reference"] / "model")
    batch = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)[0].tolist()
    assert len(generated["ids"]) > batch["input_ids"].shape[1]
    assert generated["ids"] == expected
    # The target's tokenizer came along.
    assert AutoTokenizer.from_pretrained(out)(PROMPT)["input_ids"] == AutoTokenizer.from_pretrained(tiny_tied_target)(PROMPT)["input_ids"]


def test_sixteen_bit_export_of_a_chosen_tag(runs, tmp_path):
    out = tmp_path / "bf16"
    result = export(runs["checkpointed"], "--tag", "step3", "--dtype", "bf16", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = load_file(out / "model.safetensors")
    reference = load_file(runs["reference"] / "model" / "model.safetensors")
    for key in reference:
        assert exported[key].dtype == torch.bfloat16, key
        assert torch.equal(exported[key], reference[key].to(torch.bfloat16)), key
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def load_cli():
    spec = importlib.util.spec_from_file_location("export_cli", ROOT / "launch/export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def damage_latest_empty(checkpoints: Path) -> Path:
    (checkpoints / "latest").write_text("")
    return checkpoints / "latest"


def damage_latest_dangling(checkpoints: Path) -> Path:
    (checkpoints / "latest").write_text("step9\n")
    return checkpoints / "step9"


def damage_missing_shard(checkpoints: Path) -> Path:
    shard, = (checkpoints / "step3").glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt")
    shard.unlink()
    return checkpoints / "step3"


def damage_truncated_shard(checkpoints: Path) -> Path:
    shard, = (checkpoints / "step3").glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt")
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    return checkpoints / "step3"


def damage_empty_shard(checkpoints: Path) -> Path:
    shard, = (checkpoints / "step3").glob("zero_pp_rank_0_mp_rank_00_model_states.pt")
    shard.write_bytes(b"")
    return shard


@pytest.mark.parametrize("damage, says", [
    (damage_latest_empty, "is empty"), (damage_latest_dangling, "no such checkpoint tag; choose one of ['step1', 'step2', 'step3']"),
    (damage_missing_shard, "optim-state shard of rank(s) [1] is missing"), (damage_truncated_shard, "damaged checkpoint"),
    (damage_empty_shard, "empty shard"),
])
def test_damaged_checkpoint_is_one_line_naming_the_path(runs, tmp_path, capsys, damage, says):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(runs["checkpointed"] / "checkpoints", checkpoints)
    shutil.copy(runs["checkpointed"] / "config.yaml", tmp_path / "config.yaml")
    named = damage(checkpoints)
    assert load_cli().main([str(checkpoints), "--out", str(tmp_path / "out")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"error: {named}") and says in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_missing_checkpoint_wrong_target_and_taken_output_are_named(runs, tmp_path, capsys, tiny_sources):
    cli = load_cli()
    assert cli.main([str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nope'}: no such checkpoint folder")

    checkpoints = runs["checkpointed"] / "checkpoints"
    assert cli.main([str(checkpoints), "--target", str(tiny_sources[0]), "--out", str(tmp_path / "out")]) == 2
    stderr = capsys.readouterr().err
    assert f"the weights do not fit the target {tiny_sources[0]}" in stderr and "model.embed_tokens.weight (301, 32) vs (283, 32)" in stderr

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert cli.main([str(checkpoints), "--out", str(tmp_path / "taken")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'taken'}: exists and is not empty")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_an_older_tag_exports_when_latest_is_damaged(runs, tmp_path, capsys):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(runs["checkpointed"] / "checkpoints", checkpoints)
    shutil.copy(runs["checkpointed"] / "config.yaml", tmp_path / "config.yaml")
    damage_latest_empty(checkpoints)
    damage_truncated_shard(checkpoints)  # step3
    assert load_cli().main([str(checkpoints), "--tag", "step2", "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    step2 = load_file(tmp_path / "out" / "model.safetensors")
    step3 = load_file(runs["reference"] / "model" / "model.safetensors")
    # One optimizer step apart, and neither is the other.
    assert step2.keys() == step3.keys() and any(not torch.equal(step2[key], step3[key]) for key in step2)
