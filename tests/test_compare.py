"""The mode comparison: run matrix, per-run configs, the interference metric on hand-made numbers, table, plots."""
from __future__ import annotations

import datasets
import pytest

from experiments.comparison import (
    RunOutcome,
    RunSpec,
    Spread,
    balanced_sample,
    check_bar,
    interference,
    markdown_table,
    plot_comparison,
    reusable_runs,
    run_config,
    run_key,
    run_matrix,
    summarise,
)

BASE = {
    "target": "t",
    "run": {"seed": 7, "output_dir": "x"},
    "sources": [{"name": "a", "path": "pa"}, {"name": "b", "path": "pb"}, {"name": "c", "path": "pc"}],
    "fusion": {"mode": "predictive", "lam": 0.9},
    "selector": {"tau": 0.3, "max_sources": 2},
}


def test_interference_counts_and_sums_only_degraded_domains():
    baseline = {"bible": 2.0, "code": 2.5, "wiki": 3.0, "all": 2.4}
    fused = {"bible": 2.25, "code": 2.4, "wiki": 3.5, "all": 9.0}  # +0.25, -0.1, +0.5; "all" is ignored
    assert interference(fused, baseline) == interference(fused, baseline, tolerance=0.0)
    measured = interference(fused, baseline)
    assert measured.degraded == 2 and measured.summed == pytest.approx(0.75)
    assert interference(fused, baseline, tolerance=0.3).degraded == 1
    with pytest.raises(KeyError, match="wiki"):
        interference({"bible": 1.0, "code": 1.0}, baseline)


def test_summaries_measure_each_seed_against_its_own_baseline():
    def outcome(mode, seed, bible, code, tokens, sources=("a", "b")):
        return RunOutcome(RunSpec(mode, () if mode == "none" else sources, seed), {"bible": bible, "code": code},
                          {name: tokens for name in ([] if mode == "none" else sources)})

    outcomes = [outcome("none", 1, 2.0, 3.0, 0), outcome("none", 2, 2.2, 3.0, 0),
                outcome("all_uniform", 1, 2.1, 2.9, 100), outcome("all_uniform", 2, 2.5, 3.2, 100),
                outcome("predictive", 1, 1.9, 2.95, 40), outcome("predictive", 2, 2.2, 2.9, 20)]
    by_mode = {s.mode: s for s in summarise(outcomes)}
    uniform, predictive = by_mode["all_uniform"], by_mode["predictive"]
    # Seed 1: bible +0.1 (code improves); seed 2: bible +0.3, code +0.2.
    assert uniform.degraded == Spread(1.5, 1, 2)
    assert uniform.summed_degradation.mean == pytest.approx(0.3) and uniform.summed_degradation.high == pytest.approx(0.5)
    assert predictive.degraded == Spread(0, 0, 0) and predictive.summed_degradation == Spread(0, 0, 0)
    assert uniform.source_tokens == Spread(200, 200, 200) and predictive.source_tokens == Spread(60, 40, 80)
    assert predictive.mean_bits_per_byte.mean == pytest.approx((2.425 + 2.55) / 2)
    table = markdown_table(list(by_mode.values()))
    assert "| predictive (2 src) | 2.050 ± 0.150 |" in table and "| 30% |" in table
    with pytest.raises(ValueError, match="seed 3"):
        summarise([*outcomes, outcome("predictive", 3, 1.0, 1.0, 1)])


def test_bar_on_hand_made_numbers():
    """Training domains bible and code, unseen domain poems; ground truth: a is best on bible, b on code."""
    truth = {"a": {"bible": 1.0, "code": 2.0, "poems": 1.5}, "b": {"bible": 2.0, "code": 1.0, "poems": 1.2}}
    routing = {"bible": {"a": 0.9, "b": 0.2}, "code": {"a": 0.1, "b": 0.85}, "poems": {"a": 0.5, "b": 0.5}}

    def outcome(mode, bible, code, poems, tokens, routes=None):
        sources = () if mode == "none" else ("a", "b")
        return RunOutcome(RunSpec(mode, sources, 1), {"bible": bible, "code": code, "poems": poems},
                          {name: tokens for name in sources}, routes or {}, unseen=("poems",))

    outcomes = [outcome("none", 2.0, 3.0, 2.5, 0), outcome("all_uniform", 1.95, 2.95, 2.4, 100),
                outcome("min_ce", 1.9, 2.92, 2.4, 100), outcome("domain_oracle", 1.85, 2.8, 2.4, 50),
                outcome("predictive", 1.86, 2.8, 2.45, 40, routing)]
    summaries = summarise(outcomes)
    predictive = next(s for s in summaries if s.mode == "predictive")
    assert predictive.mean_bits_per_byte.mean == pytest.approx((1.86 + 2.8) / 2)  # poems left out
    lines = check_bar(summaries, truth)
    assert [ok for _, ok in lines] == [True, True, True, True, True, True]
    assert "bible -> a 90%" in lines[4][0] and "code -> b 85%" in lines[4][0]
    # Each part can fail: worse than min_ce, 0.02 behind the oracle, code degraded, 50% compute,
    # bible routed to a 70% of the time, worse than none on poems.
    failing = [outcome("none", 2.0, 2.9, 2.4, 0), outcome("all_uniform", 1.95, 2.95, 2.4, 100),
               outcome("min_ce", 1.85, 2.8, 2.4, 100), outcome("domain_oracle", 1.80, 2.8, 2.4, 50),
               outcome("predictive", 1.84, 2.95, 2.45, 50, {**routing, "bible": {"a": 0.7, "b": 0.3}})]
    assert [ok for _, ok in check_bar(summarise(failing), truth)] == [False, False, False, False, False, False]


def test_plots_are_written(tmp_path):
    outcomes = [RunOutcome(RunSpec("none", (), 1), {"bible": 2.0, "code": 3.0}, {})]
    for pool in (("a",), ("a", "b")):
        for mode, shift in (("all_uniform", 0.1), ("predictive", -0.1)):
            outcomes.append(RunOutcome(RunSpec(mode, pool, 1), {"bible": 2.0 + shift, "code": 3.0}, {name: 10 for name in pool}))
    paths = plot_comparison(summarise(outcomes), tmp_path)
    assert [p.name for p in paths] == ["bpb_by_mode.png", "interference.png", "source_compute.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_run_matrix_runs_pool_modes_on_every_pool_and_the_baseline_once_per_seed():
    pools = [["a", "b"], ["a", "b", "c"]]
    specs = run_matrix(["none", "min_ce", "predictive"], pools, ["predictive"], [1, 2])
    assert len(specs) == 2 * (1 + 1 + 2)
    assert [s.name for s in specs] == ["none-seed1", "none-seed2", "min_ce-3src-seed1", "min_ce-3src-seed2",
                                       "predictive-3src-seed1", "predictive-3src-seed2", "predictive-2src-seed1",
                                       "predictive-2src-seed2"]
    with pytest.raises(ValueError, match="pool modes"):
        run_matrix(["none"], pools, ["predictive"], [1])
    with pytest.raises(ValueError, match="distinct"):
        run_matrix(["none"], [["a", "a"]], [], [1])


def test_run_config_keeps_the_pool_in_config_order_and_caps_max_sources():
    config = run_config(BASE, RunSpec("predictive", ("c", "a"), 3), "out/r", {"data": {"corpus": "k"}})
    assert [s["name"] for s in config["sources"]] == ["a", "c"]
    assert config["run"] == {"seed": 3, "output_dir": "out/r"}
    assert config["selector"]["max_sources"] == 2 and config["data"] == {"corpus": "k"}
    assert run_config(BASE, RunSpec("predictive", ("b",), 3), "o")["selector"]["max_sources"] == 1
    assert BASE["selector"]["max_sources"] == 2 and len(BASE["sources"]) == 3  # the base is not modified
    with pytest.raises(ValueError, match=r"\['z'\]"):
        run_config(BASE, RunSpec("predictive", ("z",), 1), "o")


def test_run_key_ignores_settings_a_baseline_cannot_use():
    def key(mode, tau, seed=1):
        base = {**BASE, "selector": {**BASE["selector"], "tau": tau}, "fusion": {**BASE["fusion"], "sharpen_temperature": tau}}
        return run_key(run_config(base, RunSpec(mode, () if mode == "none" else ("a", "b"), seed), "out"))

    assert key("none", 0.3) == key("none", 0.2) != key("none", 0.3, seed=2)
    assert key("predictive", 0.3) != key("predictive", 0.2) != key("scores", 0.2) != key("scores", 0.3)
    assert key("all_uniform", 0.3) == key("all_uniform", 0.2) != key("all_uniform", 0.3, seed=2)


def test_balanced_sample_takes_the_same_count_of_every_domain():
    chunks = datasets.Dataset.from_dict({"text": [str(i) for i in range(30)], "domain": ["x"] * 20 + ["y"] * 7 + ["z"] * 3})
    sample = balanced_sample(chunks, 3, seed=4)
    assert sorted(sample["domain"]) == ["x"] * 3 + ["y"] * 3 + ["z"] * 3
    assert sample["text"] == balanced_sample(chunks, 3, seed=4)["text"] != balanced_sample(chunks, 3, seed=5)["text"]
    assert [int(t) for t in sample["text"]] == sorted(int(t) for t in sample["text"])
    with pytest.raises(ValueError, match="'z' has 3 chunks"):
        balanced_sample(chunks, 4, seed=0)


def test_earlier_runs_are_reused_only_on_the_same_ground_truth():
    truth = {"a": {"code": 1.0, "wiki": 2.0}, "b": {"code": 1.5, "wiki": 1.25}}
    runs = [{"name": "none-seed1-0123abcd", "mode": "none"}, {"name": "min_ce-seed1-89abcdef", "mode": "min_ce"}]
    previous = {"ground_truth": {"a": {"code": 1.0 + 1e-9, "wiki": 2.0}, "b": {"code": 1.5, "wiki": 1.25}}, "runs": runs}
    assert reusable_runs(previous, truth) == {run["name"]: run for run in runs}
    for changed in ({"a": {"code": 1.1, "wiki": 2.0}, "b": truth["b"]},  # another score
                    {"a": truth["a"]},  # a source fewer
                    {"a": {"code": 1.0}, "b": truth["b"]}):  # a domain fewer
        with pytest.raises(ValueError, match="ground truth differs"):
            reusable_runs({**previous, "ground_truth": changed}, truth)
