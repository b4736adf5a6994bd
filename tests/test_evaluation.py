"""Held-out evaluation: perplexity and bits per byte against hand-computed values on tiny models."""
from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion.evaluation import (
    evaluate_by_domain,
    evaluate_models,
    resolve_model_dir,
    sequence_nll,
)

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Cat dog horse.", "Red green blue yellow black.", "One two.", "Sheep goat cow lion tiger bear wolf fox."]
DOMAINS = ["animals", "colours", "numbers", "animals"]


class BigramLM(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: the next-token distribution depends on the current token only."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask):
        return type("Output", (), {"logits": self.table[input_ids]})


def hand_nll(table: torch.Tensor, ids: list[int]) -> float:
    """Σ_t -log softmax(table[ids[t]])[ids[t+1]], one scalar at a time."""
    total = 0.0
    for current, following in itertools.pairwise(ids):
        row = table[current].tolist()
        total += math.log(sum(math.exp(value) for value in row)) - row[following]
    return total


def test_sequence_nll_matches_a_loop_and_skips_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 13)
    input_ids = torch.randint(0, 13, (2, 7))
    attention_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    nll, count = sequence_nll(logits, input_ids, attention_mask)
    for row, length in enumerate((7, 4)):
        expected = sum(-torch.log_softmax(logits[row, t], -1)[input_ids[row, t + 1]].item() for t in range(length - 1))
        assert nll[row].item() == pytest.approx(expected, rel=1e-5)
        assert count[row].item() == length - 1


def test_bigram_model_perplexity_and_bits_per_byte_by_hand(tiny_target):
    tokenizer = AutoTokenizer.from_pretrained(tiny_target)
    torch.manual_seed(1)
    table = torch.randn(len(tokenizer), len(tokenizer))
    scores = evaluate_by_domain(BigramLM(table), tokenizer, TEXTS, DOMAINS, batch_size=3, max_length=64)
    ids = [tokenizer(text)["input_ids"] for text in TEXTS]
    for domain in ("animals", "colours", "numbers"):
        rows = [i for i, d in enumerate(DOMAINS) if d == domain]
        nll = sum(hand_nll(table, ids[i]) for i in rows)
        tokens = sum(len(ids[i]) - 1 for i in rows)
        text_bytes = sum(len(TEXTS[i].encode("utf-8")) for i in rows)
        assert scores[domain].tokens == tokens and scores[domain].bytes == text_bytes
        assert scores[domain].perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-4)
        assert scores[domain].bits_per_byte == pytest.approx(nll / text_bytes / math.log(2), rel=1e-4)
    assert scores["all"].sequences == len(TEXTS)


def test_uniform_model_has_the_vocabulary_size_as_perplexity(tiny_target):
    """Equal logits: every token costs ln V nats, so perplexity is V and bpb is tokens·log2 V / bytes."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_target)
    vocab = len(tokenizer)
    scores = evaluate_by_domain(BigramLM(torch.zeros(vocab, vocab)), tokenizer, TEXTS, DOMAINS, batch_size=2, max_length=64)
    assert scores["all"].perplexity == pytest.approx(vocab, rel=1e-5)
    assert scores["all"].bits_per_byte == pytest.approx(scores["all"].tokens * math.log2(vocab) / scores["all"].bytes, rel=1e-5)


def test_batched_evaluation_of_a_model_folder_equals_one_text_at_a_time(tiny_target):
    """Padding and batching change nothing: each text scored alone, unpadded, gives the same totals."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_target)
    model = AutoModelForCausalLM.from_pretrained(tiny_target).eval()
    scores = evaluate_models({"tiny": tiny_target}, TEXTS, DOMAINS, batch_size=4, max_length=64)["tiny"]
    nll = 0.0
    for text in TEXTS:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        nll -= log_probs.gather(-1, ids[0, 1:, None]).sum().item()
    assert scores["all"].nll == pytest.approx(nll, rel=1e-4)


def test_resolve_model_dir_accepts_a_run_folder(tmp_path, tiny_target):
    assert resolve_model_dir(tiny_target) == tiny_target
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model").symlink_to(tiny_target)
    assert resolve_model_dir(tmp_path / "run") == tmp_path / "run" / "model"
    with pytest.raises(ValueError, match="not a Hugging Face model folder"):
        resolve_model_dir(tmp_path)


def test_evaluate_launcher_writes_json_and_names_a_bad_model(tmp_path, tiny_target, tiny_sources, tiny_corpus):
    config = {"target": str(tiny_target), "run": {"cache_dir": str(tmp_path / "cache")},
              "sources": [{"name": path.name, "path": str(path)} for path in tiny_sources],
              "data": {"corpus": str(tiny_corpus), "max_length": 48, "max_eval_chunks": 9},
              "trainer": {"deepspeed_config": str(ROOT / "ds_configs" / "zero3.json")}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, str(ROOT / "launch" / "evaluate.py"), "--config", str(tmp_path / "run.yaml")]
    out = tmp_path / "eval.json"
    result = subprocess.run([*command, "--model", f"trained={tiny_target}", "--sources", "--out", str(out)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["chunks"] == 9 and set(report["models"]) == {"trained", "bpe", "wordpiece"}
    for scores in report["models"].values():
        assert sum(row["sequences"] for domain, row in scores.items() if domain != "all") == 9
        assert scores["all"]["bits_per_byte"] == pytest.approx(scores["all"]["nll"] / scores["all"]["bytes"] / math.log(2))
    bad = subprocess.run([*command, "--model", str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert bad.returncode == 2 and "not a Hugging Face model folder" in bad.stderr
