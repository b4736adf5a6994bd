"""The specialist stage: only the top layers train, and an interrupted build resumes to exactly the same model."""
from __future__ import annotations

import json
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import save_tiny_target, tiny_documents
from fusion.assets.specialists import (RECORD_NAME, RESUME_NAME, SpecialistSpec, batch_order, ensure_specialist,
                                       trainable_parameters, train_specialist)


def test_only_the_last_layers_and_the_final_norm_train(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_tiny_target(tmp_path / "base", tie_word_embeddings=True))
    trained = trainable_parameters(model, 1)
    assert trained and all(name.startswith(("model.layers.1.", "model.norm.")) for name in trained)
    assert not any(parameter.requires_grad for name, parameter in model.named_parameters() if name not in trained)
    with pytest.raises(ValueError, match="train_layers=3"):
        trainable_parameters(model, 3)


def test_batch_order_is_seeded_epochs():
    batches = batch_order(5, steps=4, batch_size=3, seed=0)
    flat = [index for batch in batches for index in batch]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))  # whole epochs, then the next
    assert batches == batch_order(5, 4, 3, seed=0) and batches != batch_order(5, 4, 3, seed=1)


def test_an_interrupted_build_resumes_to_the_same_model(tmp_path, monkeypatch):
    texts = [text for _, text in tiny_documents(seed=3, per_domain=10)]
    spec = SpecialistSpec("spec", "base", "any", train_layers=1, steps=4, batch_size=2, max_length=32, lr=1e-2,
                          warmup_steps=1, checkpoint_every=2)
    for root in ("straight", "resumed"):
        save_tiny_target(tmp_path / root / "base", tie_word_embeddings=True)
    record = train_specialist(spec, texts, tmp_path / "straight", seed=0)
    assert record["trained_parameters"] < record["parameters"]
    assert json.loads((tmp_path / "straight" / "spec" / RECORD_NAME).read_text())["spec"]["steps"] == 4

    # Interrupt the second build right after its step-2 checkpoint (the 3rd optimizer step raises).
    calls = {"count": 0}
    original = torch.optim.AdamW.step

    def failing_step(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        train_specialist(spec, texts, tmp_path / "resumed", seed=0)
    assert (tmp_path / "resumed" / "spec.partial" / RESUME_NAME).is_file()
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    train_specialist(spec, texts, tmp_path / "resumed", seed=0)
    assert not (tmp_path / "resumed" / "spec.partial").exists()

    straight = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "spec").state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "spec").state_dict()
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


def test_ensure_needs_the_base_and_the_domain(tmp_path):
    spec = SpecialistSpec("spec", "base", "code")
    with pytest.raises(FileNotFoundError, match="sources"):
        ensure_specialist(spec, [], tmp_path, seed=0)
    save_tiny_target(tmp_path / "base", tie_word_embeddings=True)
    with pytest.raises(ValueError, match="no training documents"):
        ensure_specialist(spec, [{"text": "x", "domain": "wiki"}], tmp_path, seed=0)


def test_report_names_the_best_source_per_domain_and_each_specialists_margin():
    from fusion.assets.build import report_markdown

    def row(bpb):
        return {"perplexity": 2 ** bpb, "bits_per_byte": bpb}

    scores = {  # bible, code, shakespeare, wiki, all
        "smollm2-135m": (1.27, 0.98, 1.95, 0.96, 1.2), "gemma3-270m": (1.03, 0.99, 1.92, 0.88, 1.1),
        "code-smollm2": (1.27, 0.86, 1.95, 0.95, 1.2), "bible-smollm2": (1.02, 1.04, 2.03, 0.98, 1.2),
        "shakespeare-gemma3": (1.33, 1.27, 1.68, 1.14, 1.3), "target": (2.0, 2.6, 2.8, 2.6, 2.5)}
    domains = ("bible", "code", "shakespeare", "wiki", "all")
    report = {"models": {name: {d: row(v) for d, v in zip(domains, values)} for name, values in scores.items()}}
    text = report_markdown(report)
    assert "| code | code-smollm2 | 0.860 | smollm2-135m | 0.980 |" in text
    assert "| bible | bible-smollm2 | 1.020 | gemma3-270m | 1.030 |" in text
    assert "| wiki | gemma3-270m | 0.880 |" in text  # the target is never a source
    assert "| code-smollm2 | code | 0.860 | 0.980 | +0.120 | met |" in text
    assert "| bible-smollm2 | bible | 1.020 | 1.030 | +0.010 | NOT met |" in text
    assert "| shakespeare-gemma3 | shakespeare | 1.680 | 1.920 | +0.240 | met |" in text
