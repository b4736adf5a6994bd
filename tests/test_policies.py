"""Fusion policies against hand-computed weights and choices (tiny tensors, no models)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fusion.config import FUSION_MODES, ConfigError, parse_config, read_ground_truth
from fusion.policies import POLICIES, make_policy
from fusion.sources.answer import SparseSoftLabels

B, L, K = 3, 5, 2


def config(mode: str, **selector):
    return parse_config({"target": "t", "fusion": {"mode": mode}, "selector": selector,
                         "sources": [{"name": name, "path": name} for name in "abc"]}, check_paths=False)


def answers(nll_per_token: list[list[float]], nll_per_byte: list[list[float]]) -> list[SparseSoftLabels]:
    """One answer per source with the given per-sequence scores (columns: sources; NaN: not answered)."""
    result = []
    for s in range(len(nll_per_token[0])):
        answer = SparseSoftLabels.empty(B, L, K, torch.float32)
        answer.nll_per_token[:] = torch.tensor([row[s] for row in nll_per_token])
        answer.nll_per_byte[:] = torch.tensor([row[s] for row in nll_per_byte])
        result.append(answer)
    return result


def make(mode: str, **selector):
    return make_policy(config(mode, **selector), 3, vocab_size=17, device=torch.device("cpu"), seed=0,
                       average_gradients=lambda grads: None, sum_over_ranks=lambda value: value,
                       families=[0, 1, 2])


BATCH = {"input_ids": torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8], [9, 1, 2, 3, 4]]),
         "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1] * 5, [1] * 5])}
NAN = math.nan


def test_every_mode_has_exactly_one_policy():
    assert set(POLICIES) == set(FUSION_MODES)
    assert all(POLICIES[mode].name == mode for mode in FUSION_MODES)


def test_baselines_weigh_only_what_ran():
    ran = torch.tensor([[True, True, False], [False, True, True], [True, False, False]])
    per_token = [[2.0, 1.0, NAN], [NAN, 3.0, 0.5], [1.5, NAN, NAN]]
    got = answers(per_token, per_token)
    # all_uniform: 1/|A| over the sources that answered anything, then renormalised over each row's own.
    assert make("all_uniform").weigh(BATCH, got, ran).tolist() == [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]
    # min_ce: the lowest per-token CE among the row's answers.
    assert make("min_ce").weigh(BATCH, got, ran).tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    # avg_ce (FuseLLM's): softmax of exp(-CE) over the row's answers.
    weights = make("avg_ce").weigh(BATCH, got, ran)
    a, b = math.exp(math.exp(-2.0)), math.exp(math.exp(-1.0))
    assert weights[0].tolist() == pytest.approx([a / (a + b), b / (a + b), 0.0])
    assert weights[2].tolist() == pytest.approx([1.0, 0.0, 0.0])


def test_every_available_source_is_asked_by_the_baselines_and_none_by_none():
    available = torch.tensor([True, False, True])
    for mode in ("all_uniform", "min_ce", "avg_ce", "scores"):
        assert make(mode).choose(BATCH, available, step=1).tolist() == [[True, False, True]] * B
    assert not make("none").choose(BATCH, available, step=1).any()


def test_nothing_answered_means_no_weight_and_nothing_learnt():
    ran = torch.zeros(B, 3, dtype=torch.bool)
    empty = answers([[NAN] * 3] * B, [[NAN] * 3] * B)
    for mode in ("all_uniform", "min_ce", "scores", "predictive"):
        policy = make(mode)
        before = {key: value.clone() for key, value in policy.state_dict().get("selector", {}).items()}
        assert policy.weigh(BATCH, empty, ran).tolist() == [[0.0] * 3] * B
        policy.learn(BATCH, empty, ran)
        for key, value in policy.state_dict().get("selector", {}).items():
            assert torch.equal(value, before[key]), (mode, key)


def test_predictive_chooses_by_threshold_before_any_source_runs():
    policy = make("predictive", objective="ranking", tau=0.3, min_sources=1, max_sources=2,
                  exploration={"start": 0.0, "end": 0.0, "decay_steps": 1, "measure_steps": 0})
    with torch.no_grad():
        probs = policy.selector(BATCH["input_ids"], BATCH["attention_mask"]).softmax(-1)
    chosen = policy.choose(BATCH, torch.ones(3, dtype=torch.bool), step=1)
    for row in range(B):
        order = probs[row].argsort(descending=True).tolist()
        expected = {order[0]} | {s for rank, s in enumerate(order[:2]) if probs[row, s] > 0.3}
        assert set(chosen[row].nonzero().flatten().tolist()) == expected


def test_scores_gate_fuses_the_best_realised_source_when_sharp():
    policy = make("scores", tau=0.5, max_sources=1, gate_temperature=0.01)
    ran = torch.ones(B, 3, dtype=torch.bool)
    per_byte = [[1.0, 0.5, 2.0], [0.9, 1.2, 0.3], [0.4, 0.6, 0.8]]
    weights = policy.weigh(BATCH, answers(per_byte, per_byte), ran)
    assert weights.argmax(1).tolist() == [1, 2, 0] and weights.sum(1).tolist() == pytest.approx([1.0] * B)
    assert (weights > 0).sum(1).tolist() == [1, 1, 1]


def test_gate_policies_learn_and_checkpoint_through_state_dict():
    policy = make("predictive", objective="ranking", target_temperature=0.1)
    ran = torch.ones(B, 3, dtype=torch.bool)
    per_byte = [[1.0, 0.5, 2.0]] * B
    before = {key: value.clone() for key, value in policy.state_dict()["selector"].items()}
    policy.learn(BATCH, answers(per_byte, per_byte), ran)
    assert any(not torch.equal(value, before[key]) for key, value in policy.state_dict()["selector"].items())
    assert policy.stats()["select/loss"] > 0
    restored = make("predictive", objective="ranking", target_temperature=0.1)
    restored.load_state_dict(policy.state_dict())
    for key, value in restored.state_dict()["selector"].items():
        assert torch.equal(value, policy.state_dict()["selector"][key])
    assert torch.equal(restored.generator.get_state(), policy.generator.get_state())


def test_reference_policies_route_by_the_ground_truth(tmp_path):
    # Held-out bpb per source and domain, as launch/evaluate.py --sources writes it.
    truth = {"a": {"animals": 1.0, "colours": 3.0}, "b": {"animals": 2.0, "colours": 1.5}, "c": {"animals": 2.5, "colours": 2.5}}
    path = tmp_path / "truth.json"
    path.write_text(json.dumps({"models": {name: {d: {"bits_per_byte": v} for d, v in rows.items()} | {"all": {"bits_per_byte": 0.0}}
                                           for name, rows in truth.items()}}))
    batch = {**BATCH, "domains": ["animals", "colours", "numbers"]}
    everyone = torch.ones(3, dtype=torch.bool)

    def policy(mode, **fusion):
        raw = {"target": "t", "fusion": {"mode": mode, "ground_truth": str(path), **fusion},
               "sources": [{"name": name, "path": name} for name in "abc"]}
        return make_policy(parse_config(raw, check_paths=False), 3)

    # Means: a 2.0, b 1.75, c 2.5. An unmeasured domain ("numbers") falls back to the mean.
    assert policy("domain_oracle").choose(batch, everyone, 1).tolist() == [[True, False, False], [False, True, False],
                                                                          [False, True, False]]
    assert policy("domain_oracle").choose(batch, torch.tensor([False, True, True]), 1)[0].tolist() == [False, True, False]
    assert policy("best_single").choose(batch, everyone, 1).tolist() == [[False, True, False]] * B
    assert policy("static_top_k").choose(batch, everyone, 1).tolist() == [[True, True, False]] * B
    assert policy("static_top_k", static_k=3).choose(batch, everyone, 1).all()
    ran = torch.tensor([[True, True, False], [False, True, False], [True, False, True]])
    assert policy("static_top_k").weigh(batch, [], ran).tolist() == [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]


def test_reference_modes_need_a_ground_truth(tmp_path):
    raw = {"target": "t", "fusion": {"mode": "domain_oracle"}, "sources": [{"name": "a", "path": "a"}]}
    with pytest.raises(ConfigError, match="fusion.ground_truth: mode 'domain_oracle' routes by"):
        parse_config(raw, check_paths=False)
    (tmp_path / "bad.json").write_text("[]")
    raw["fusion"]["ground_truth"] = str(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="is not a launch/evaluate.py JSON"):
        read_ground_truth(raw["fusion"]["ground_truth"])


def test_predictive_measures_every_source_first_then_chooses_by_predicted_score():
    policy = make("predictive", objective="regression", tau=0.4, max_sources=1, gate_temperature=0.1,
                  exploration={"start": 0.0, "end": 0.0, "decay_steps": 1, "measure_steps": 2})
    available = torch.tensor([True, True, False])
    for step in (0, 1):
        assert policy.choose(BATCH, available, step).tolist() == [[True, True, False]] * B
    per_byte = [[1.0, 0.5, NAN]] * B  # source 1 is better on every sequence
    ran = torch.tensor([[True, True, False]] * B)
    policy.learn(BATCH, answers(per_byte, per_byte), ran)
    # The first update starts each source's predicted score at its mean: source 1 is preferred.
    assert policy.choose(BATCH, available, step=2).tolist() == [[False, True, False]] * B
    assert policy.stats()["select/ce"] >= 0
    restored = make("predictive", objective="regression")
    restored.load_state_dict(policy.state_dict())
    assert bool(restored.selector.output_initialised)


@pytest.mark.parametrize("distinct, second", [(False, 1), (True, 2)])
def test_predictive_takes_its_second_source_from_another_tokenizer_when_asked(distinct, second):
    """Sources 0 and 1 share a tokenizer; measured scores 0.5, 0.7, 0.9: the two best are 0 and 1,
    the best pair of distinct tokenizers is 0 and 2."""
    policy = make_policy(config("predictive", objective="regression", max_sources=2, distinct_tokenizers=distinct,
                                exploration={"start": 0.0, "end": 0.0, "decay_steps": 1, "measure_steps": 1}),
                         3, vocab_size=17, device=torch.device("cpu"), seed=0, average_gradients=lambda grads: None,
                         sum_over_ranks=lambda value: value, families=[0, 0, 2])
    per_byte = [[0.5, 0.7, 0.9]] * B
    policy.learn(BATCH, answers(per_byte, per_byte), torch.ones(B, 3, dtype=torch.bool))
    chosen = policy.choose(BATCH, torch.ones(3, dtype=torch.bool), step=1)
    assert chosen.tolist() == [[True, second == 1, second == 2]] * B


def test_tokenizer_families_group_identical_tokenizers():
    from test_scoring import byte_level_tokenizer, metaspace_tokenizer

    from fusion.policies import tokenizer_families
    from fusion.vocab_map import tokenizer_sha256

    tokenizers = [byte_level_tokenizer(301, bos=True), metaspace_tokenizer(157), byte_level_tokenizer(301, bos=True),
                  byte_level_tokenizer(263, bos=False)]
    assert tokenizer_families([tokenizer_sha256(tokenizer) for tokenizer in tokenizers]) == [0, 1, 0, 3]


def test_linucb_chooses_optimistically_in_training_and_by_its_prediction_on_held_out():
    """Sources 0 and 1 answered every row 12 times (1.0 and 1.2 bits per byte), source 2 never: it
    predicts the mean score, 1.1, with the prior's width sqrt(|x|^2 / lambda) = sqrt(2). Held-out
    routing takes the best prediction (source 0); training takes the best of m - 0.3 w (source 2)."""
    policy = make("predictive", objective="linucb", optimism=0.3, ridge=1.0, min_sources=1, max_sources=1,
                  exploration={"start": 0.0, "end": 0.0, "decay_steps": 1, "measure_steps": 0})
    ran = torch.tensor([[True, True, False]] * B)
    per_byte = [[1.0, 1.2, NAN]] * B
    for _ in range(12):
        policy.learn(BATCH, answers(per_byte, per_byte), ran)
    predicted, width = policy.selector(BATCH["input_ids"], BATCH["attention_mask"])
    torch.testing.assert_close(predicted[:, 2], torch.full((B,), 1.1))
    torch.testing.assert_close(width[:, 2], torch.full((B,), math.sqrt(2.0)))
    assert predicted[:, 0].max() < 1.01 and width[:, 0].max() < 0.3
    available = torch.ones(3, dtype=torch.bool)
    assert policy.route(BATCH, available).tolist() == [[True, False, False]] * B
    assert policy.choose(BATCH, available, step=1).tolist() == [[False, False, True]] * B
    # The weights among the chosen follow the prediction, not the optimism.
    weights = policy.weigh(BATCH, answers(per_byte, per_byte), ran)
    assert (weights[:, 0] > weights[:, 1]).all() and (weights[:, 2] == 0).all()
    assert set(policy.stats()) == {"select/loss", "select/width", "select/gate_entropy"}
    restored = make("predictive", objective="linucb")
    restored.load_state_dict(policy.state_dict())
    assert "optimizer" not in policy.state_dict()
    torch.testing.assert_close(restored.selector(BATCH["input_ids"], BATCH["attention_mask"]), (predicted, width))
