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
