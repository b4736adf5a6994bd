"""Real pretrained source models, exported from the GGUF files that registry packages carry.

``export_smollm2`` / ``export_gemma3`` write a plain Hugging Face folder (``config.json``,
``model.safetensors``, ``generation_config.json`` and the tokenizer files of
``fusion.assets.tokenizers``) that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load offline, plus ``export_report.json`` with the perplexity on a
fixed sentence (the check that weights and tokenizer fit together).

Weights are dequantised from the 4-bit GGUF blocks by transformers' GGUF reader into a model built
from the GGUF's config, then stored in bfloat16: both models were released in bfloat16, it halves
the files, and its rounding (relative 2^-9) is far below the 4-bit quantisation error already in the
weights (the report records the perplexity before and after, to show it). Load them with
``dtype=torch.float32`` to compute in fp32 on CPU.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from fusion.assets.tokenizers import build_tokenizers, extract_gguf

# A plain factual sentence: a correct model with its correct tokenizer finds it unsurprising
# (SmolLM2-135M ~10, Gemma-3-270m ~9); a wrong tokenizer gives hundreds.
REFERENCE_SENTENCE = "The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889."
STORAGE_DTYPE = torch.bfloat16
REPORT_NAME = "export_report.json"


def sentence_perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str) -> float:
    """exp(mean next-token negative log-likelihood) of ``text``, in fp32, without gradients.

    The tokenizer's own special tokens are kept (Gemma's BOS), so every text token the model can
    predict counts; logits of position t score token t+1.

    Raises:
        ValueError: ``text`` gives fewer than two tokens (nothing to predict).
    """
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    if input_ids.shape[1] < 2:
        raise ValueError(f"text {text!r} has {input_ids.shape[1]} token(s); perplexity needs at least 2")
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits  # [1, L, V]
    nll = F.cross_entropy(logits[0, :-1].float(), input_ids[0, 1:])
    return math.exp(nll.item())


def perplexity(model_dir: Path, text: str) -> float:
    """Token-level perplexity of ``text`` under the model folder ``model_dir`` (see sentence_perplexity)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return sentence_perplexity(model, tokenizer, text)


def _load_dequantised(gguf_path: Path) -> PreTrainedModel:
    """fp32 model built from the GGUF's config, holding its dequantised weights.

    ``from_pretrained(gguf_file=...)`` needs accelerate, and its model refuses ``save_pretrained``;
    a model built from the config with the tensors copied in has neither problem.

    Raises:
        ValueError: the GGUF lacks a weight of the model, or holds one the model does not have.
    """
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are all overwritten; the seed keeps any buffer set at construction reproducible.
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # Tied weights (lm_head = embed_tokens) are absent from the file but share storage with a loaded one.
    state = model.state_dict()
    loaded_storage = {state[name].data_ptr() for name in tensors if name in state}
    untied = [name for name in missing if state[name].data_ptr() not in loaded_storage]
    if untied or unexpected:
        raise ValueError(f"{gguf_path.name}: weights missing from the file {untied}, not in the model {unexpected}")
    return model.eval()


def _export(
    model_name: str, wheels_dir: Path, out_dir: Path, tokenizers_root: Path | None, gguf_dir: Path | None
) -> Path:
    out_dir = Path(out_dir)
    if (out_dir / REPORT_NAME).is_file():
        return out_dir
    wheels_dir = Path(wheels_dir)
    gguf_dir = wheels_dir.parent / "gguf" if gguf_dir is None else Path(gguf_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tqdm(total=4, desc=f"export {model_name}", unit="step") as steps, tempfile.TemporaryDirectory(
        prefix=f".{out_dir.name}.", dir=out_dir.parent
    ) as scratch:
        scratch = Path(scratch)
        steps.set_postfix_str("tokenizer")
        tokenizers_root = scratch / "tokenizers" if tokenizers_root is None else tokenizers_root
        tokenizer_dir = build_tokenizers(wheels_dir, tokenizers_root, [model_name], gguf_dir=gguf_dir)[model_name]
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        steps.update()

        steps.set_postfix_str("dequantise")
        gguf_path = extract_gguf(model_name, wheels_dir, gguf_dir)
        model = _load_dequantised(gguf_path)
        perplexity_fp32 = sentence_perplexity(model, tokenizer, REFERENCE_SENTENCE)
        steps.update()

        steps.set_postfix_str("save")
        staged = scratch / "model"
        model.to(STORAGE_DTYPE).save_pretrained(staged)
        for item in tokenizer_dir.iterdir():
            shutil.copy2(item, staged / item.name)
        steps.update()

        steps.set_postfix_str("reload check")
        report = {
            "source": gguf_path.name,
            "architecture": type(model).__name__,
            "parameters": sum(parameter.numel() for parameter in model.parameters()),
            "vocab_size": model.config.vocab_size,
            "storage_dtype": str(STORAGE_DTYPE).removeprefix("torch."),
            "sentence": REFERENCE_SENTENCE,
            "sentence_tokens": len(tokenizer(REFERENCE_SENTENCE)["input_ids"]),
            "perplexity_dequantised_fp32": perplexity_fp32,
            "perplexity": perplexity(staged, REFERENCE_SENTENCE),
        }
        steps.update()
        report["export_seconds"] = round(time.perf_counter() - started, 1)
        (staged / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        for item in staged.iterdir():
            item.chmod(0o644)  # the weights file is written private
        if out_dir.exists():
            # Left by an interrupted export (no report): replace it.
            shutil.rmtree(out_dir)
        staged.rename(out_dir)
    return out_dir


def export_smollm2(
    wheels_dir: Path, out_dir: Path, *, tokenizers_root: Path | None = None, gguf_dir: Path | None = None
) -> Path:
    """Export SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M params, Apache-2.0) to ``out_dir``.

    Skipped when ``out_dir/export_report.json`` exists. The folder is assembled beside ``out_dir``
    and renamed into place, so an interrupted export leaves no report behind.

    Args:
        wheels_dir: cache of registry archives.
        out_dir: the model folder to write.
        tokenizers_root: folder of built tokenizers to reuse (``build_tokenizers`` output root);
            None builds the tokenizer in a temporary folder.
        gguf_dir: where GGUF files are extracted (default: ``gguf`` beside ``wheels_dir``).

    Returns:
        ``out_dir``.
    """
    return _export("smollm2", wheels_dir, out_dir, tokenizers_root, gguf_dir)


def export_gemma3(
    wheels_dir: Path, out_dir: Path, *, tokenizers_root: Path | None = None, gguf_dir: Path | None = None
) -> Path:
    """Export Gemma-3-270m (Gemma3ForCausalLM, 268M params, Gemma Terms of Use) to ``out_dir``.

    Same behaviour and arguments as ``export_smollm2``.
    """
    return _export("gemma3", wheels_dir, out_dir, tokenizers_root, gguf_dir)
