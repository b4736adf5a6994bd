"""Comparing fusion modes on one budget: the run matrix, the interference metric, tables and plots.

Interference (docs/METHOD.md, section 5): for a fused run and the LM-only run (``fusion.mode:
none``) of the same seed, data and budget, the degradation of domain ``d`` is

    δ_d = bpb_fused(d) - bpb_none(d)          (held-out bits per byte; > 0 means worse)

A domain is *degraded* when ``δ_d > 0``; interference is reported as both the number of degraded
domains and the summed degradation ``Σ_d max(δ_d, 0)`` (bits per byte). Gains on other domains do
not cancel a loss: that is what interference means.
"""
from __future__ import annotations

import copy
import hashlib
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from fusion.policies import POLICIES

BASELINE_MODE = "none"


def balanced_sample(chunks: datasets.Dataset, per_domain: int, seed: int) -> datasets.Dataset:
    """``per_domain`` rows of every domain of ``chunks`` (a ``domain`` column), drawn without replacement.

    Rows keep the order of ``chunks``; the same ``seed`` gives the same rows.

    Raises:
        ValueError: ``per_domain`` is not positive, or some domain has fewer rows than that.
    """
    if per_domain <= 0:
        raise ValueError(f"per_domain={per_domain} must be positive")
    domains = np.array(chunks["domain"])
    generator = np.random.default_rng(seed)
    keep = []
    for domain in sorted(set(domains.tolist())):
        rows = np.flatnonzero(domains == domain)
        if len(rows) < per_domain:
            raise ValueError(f"domain {domain!r} has {len(rows)} chunks, fewer than per_domain={per_domain}")
        keep.extend(generator.choice(rows, size=per_domain, replace=False).tolist())
    return chunks.select(sorted(keep))


@dataclass(frozen=True)
class RunSpec:
    """One training run of the comparison: a mode, its source pool and a seed."""

    mode: str
    sources: tuple[str, ...]
    seed: int

    @property
    def name(self) -> str:
        return f"{self.mode}-{len(self.sources)}src-seed{self.seed}" if self.mode != BASELINE_MODE else f"{self.mode}-seed{self.seed}"


def run_matrix(modes: Sequence[str], pools: Sequence[Sequence[str]], pool_modes: Sequence[str],
               seeds: Sequence[int]) -> list[RunSpec]:
    """Every run of a comparison: the LM-only baselines, then the full pool, then smaller pools.

    Ordered so that an interrupted comparison has whole (mode, pool) groups over all seeds first.

    Args:
        modes: fusion modes run with the largest pool (``pools[-1]``); ``none`` runs once per seed
            whether listed or not (interference is measured against it).
        pools: source-name pools, smallest first; the last is the full pool.
        pool_modes: modes also run with every smaller pool (interference by pool size).
        seeds: run seeds; every mode runs with each.

    Raises:
        ValueError: no pools or seeds, a pool_mode not among ``modes``, or an empty or duplicated pool.
    """
    if not pools or not seeds:
        raise ValueError("a comparison needs at least one source pool and one seed")
    if any(not pool or len(set(pool)) != len(pool) for pool in pools):
        raise ValueError(f"pools must be non-empty lists of distinct source names, got {[list(p) for p in pools]}")
    missing = sorted(set(pool_modes) - set(modes))
    if missing:
        raise ValueError(f"pool modes {missing} are not among the compared modes {list(modes)}")
    runs = [RunSpec(BASELINE_MODE, (), seed) for seed in seeds]
    fused = [mode for mode in modes if mode != BASELINE_MODE]
    for index in reversed(range(len(pools))):
        pool_fused = fused if index == len(pools) - 1 else [mode for mode in fused if mode in pool_modes]
        runs.extend(RunSpec(mode, tuple(pools[index]), seed) for mode in pool_fused for seed in seeds)
    return runs


def run_config(base: Mapping, spec: RunSpec, output_dir: str, overrides: Mapping[str, Mapping] | None = None) -> dict:
    """The raw config of one run: ``base`` with the run's seed, mode, sources and output folder.

    Sources keep ``base``'s order and settings; ``selector.max_sources`` is capped at the pool size.
    ``overrides`` maps a section name to keys replaced in it (e.g. ``{"data": {"corpus": ...}}``).

    Raises:
        ValueError: a pool names a source that ``base`` does not list.
    """
    config = copy.deepcopy(dict(base))
    for section, values in (overrides or {}).items():
        config[section] = {**config.get(section, {}), **values}
    known = {source["name"]: source for source in config.get("sources", [])}
    unknown = sorted(set(spec.sources) - set(known))
    if unknown:
        raise ValueError(f"pool sources {unknown} are not in the config's sources {sorted(known)}")
    config["sources"] = [source for name, source in known.items() if name in spec.sources]
    config["run"] = {**config.get("run", {}), "seed": spec.seed, "output_dir": output_dir}
    config["fusion"] = {**config.get("fusion", {}), "mode": spec.mode}
    selector = config.get("selector", {})
    if spec.sources and selector.get("max_sources") is not None:
        config["selector"] = {**selector, "max_sources": min(selector["max_sources"], len(spec.sources))}
    return config


def run_key(config: Mapping) -> str:
    """Short hash of what determines a run's outcome, so reruns with other settings never reuse it.

    Settings a mode never reads are left out, so comparisons that differ only there share runs:
    ``none`` ignores sources, fusion and selector; the fixed-weight baselines ignore the selector
    and the sharpening of gate weights.
    """
    relevant = {key: value for key, value in config.items() if key != "run"}
    relevant["seed"] = config.get("run", {}).get("seed")
    policy = POLICIES[config.get("fusion", {}).get("mode")]
    if not policy.asks_sources:
        for key in ("sources", "fusion", "selector"):
            relevant.pop(key, None)
    elif not policy.learns:
        relevant.pop("selector", None)
        relevant["fusion"] = {key: value for key, value in relevant.get("fusion", {}).items() if key != "sharpen_temperature"}
    text = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def reusable_runs(previous: Mapping, truth: Mapping[str, Mapping[str, float]], tolerance: float = 1e-3) -> dict[str, dict]:
    """The runs of an earlier comparison's ``compare.json`` (``previous``), by run name, to stand in for
    runs of the same name (mode, seed and ``run_key``: the same settings) instead of training them again.

    The ground truths must agree to ``tolerance`` bpb per source and domain: assets rebuilt on another
    machine differ in the last digits (2e-4 seen here, for a specialist), other assets by far more.

    Raises:
        ValueError: the earlier ground truth is not this one's (other assets or chunks: its runs
            trained on other sources' answers and must not be mixed in).
    """
    earlier = previous.get("ground_truth", {})
    same = earlier.keys() == truth.keys() and all(
        earlier[name].keys() == truth[name].keys() and all(abs(earlier[name][domain] - truth[name][domain]) <= tolerance
                                                           for domain in truth[name]) for name in truth)
    if not same:
        raise ValueError("its ground truth differs from this comparison's (other assets or eval chunks); "
                         "its runs cannot stand in for this comparison's")
    return {run["name"]: run for run in previous.get("runs", [])}


def domain_degradation(fused: Mapping[str, float], baseline: Mapping[str, float]) -> dict[str, float]:
    """``δ_d = fused[d] - baseline[d]`` for every domain of ``baseline`` except the pooled ``all``.

    Raises:
        KeyError: ``fused`` lacks a domain of ``baseline``.
    """
    missing = sorted(set(baseline) - set(fused))
    if missing:
        raise KeyError(f"the fused run has no score for domains {missing}")
    return {domain: fused[domain] - baseline[domain] for domain in baseline if domain != "all"}


@dataclass(frozen=True)
class Interference:
    degraded: int  # domains with δ_d > tolerance
    summed: float  # Σ_d max(δ_d, 0), bits per byte


def interference(fused: Mapping[str, float], baseline: Mapping[str, float], tolerance: float = 0.0) -> Interference:
    """Interference of a fused run against the LM-only run of the same seed (module docstring).

    Args:
        fused, baseline: held-out bits per byte per domain (an ``all`` entry is ignored).
        tolerance: a domain counts as degraded only when ``δ_d > tolerance``; the sum is unaffected.
    """
    deltas = domain_degradation(fused, baseline)
    return Interference(sum(delta > tolerance for delta in deltas.values()), sum(max(delta, 0.0) for delta in deltas.values()))


@dataclass(frozen=True)
class Spread:
    """Mean and range of one quantity over seeds."""

    mean: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        values = list(values)
        return cls(statistics.fmean(values), min(values), max(values))

    def text(self, digits: int = 3) -> str:
        half = (self.high - self.low) / 2
        return f"{self.mean:.{digits}f} ± {half:.{digits}f}"


@dataclass(frozen=True)
class RunOutcome:
    """What one finished run measured: held-out bpb per domain, source tokens requested per source, and
    (gate policies) the trained selector's routing on the held-out chunks, ``{domain: {source: share}}``.

    ``unseen`` names the held-out domains that no training sequence came from: they are reported
    beside the others but left out of the mean and of the interference."""

    spec: RunSpec
    bits_per_byte: Mapping[str, float]
    source_tokens: Mapping[str, int]
    routing: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    unseen: tuple[str, ...] = ()

    @property
    def seen_bits_per_byte(self) -> dict[str, float]:
        return {domain: value for domain, value in self.bits_per_byte.items() if domain != "all" and domain not in self.unseen}

    @property
    def mean_bits_per_byte(self) -> float:
        """Unweighted mean over the training domains (each counts the same, however many bytes it has)."""
        return statistics.fmean(self.seen_bits_per_byte.values())


@dataclass(frozen=True)
class ModeSummary:
    """One (mode, pool) over seeds; interference is against ``none`` of the same seed."""

    mode: str
    pool: tuple[str, ...]
    seeds: tuple[int, ...]
    bits_per_byte: dict[str, Spread]
    mean_bits_per_byte: Spread
    degraded: Spread
    summed_degradation: Spread
    source_tokens: Spread
    routing: dict[str, dict[str, float]] = field(default_factory=dict)  # seed mean of RunOutcome.routing
    unseen: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.mode if self.mode == BASELINE_MODE else f"{self.mode} ({len(self.pool)} src)"


def summarise(outcomes: Sequence[RunOutcome], tolerance: float = 0.0) -> list[ModeSummary]:
    """Group runs by (mode, pool), in first-seen order, with interference against ``none`` of the same seed.

    Raises:
        ValueError: some seed has fused runs but no ``none`` run.
    """
    baselines = {o.spec.seed: o for o in outcomes if o.spec.mode == BASELINE_MODE}
    groups: dict[tuple[str, tuple[str, ...]], list[RunOutcome]] = {}
    for outcome in outcomes:
        if outcome.spec.seed not in baselines:
            raise ValueError(f"seed {outcome.spec.seed} has no '{BASELINE_MODE}' run to measure interference against")
        groups.setdefault((outcome.spec.mode, outcome.spec.sources), []).append(outcome)
    summaries = []
    for (mode, pool), runs in groups.items():
        measured = [interference(run.seen_bits_per_byte, baselines[run.spec.seed].seen_bits_per_byte, tolerance)
                    for run in runs]
        domains = [domain for domain in runs[0].bits_per_byte if domain != "all"]
        routing = {domain: {name: statistics.fmean(run.routing[domain][name] for run in runs) for name in shares}
                   for domain, shares in runs[0].routing.items()} if all(run.routing for run in runs) else {}
        summaries.append(ModeSummary(
            mode, pool, tuple(run.spec.seed for run in runs),
            {domain: Spread.of(run.bits_per_byte[domain] for run in runs) for domain in domains},
            Spread.of(run.mean_bits_per_byte for run in runs),
            Spread.of(m.degraded for m in measured),
            Spread.of(m.summed for m in measured),
            Spread.of(sum(run.source_tokens.values()) for run in runs),
            routing, runs[0].unseen,
        ))
    return summaries


def markdown_table(summaries: Sequence[ModeSummary]) -> str:
    """One row per (mode, pool): per-domain and mean bpb, interference, source compute (mean ± half-range over seeds)."""
    domains = list(summaries[0].bits_per_byte)
    reference = _full_pool_uniform(summaries)
    header = (["mode (pool)", *[f"{d} bpb" for d in domains], "mean bpb", "degraded domains", "summed degradation (bpb)",
               "source tokens (k)", "compute vs all_uniform"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for summary in summaries:
        share = f"{summary.source_tokens.mean / reference.source_tokens.mean:.0%}" if reference else "n/a"
        tokens = Spread(summary.source_tokens.mean / 1e3, summary.source_tokens.low / 1e3, summary.source_tokens.high / 1e3)
        cells = [summary.label, *[summary.bits_per_byte[d].text() for d in domains], summary.mean_bits_per_byte.text(),
                 summary.degraded.text(1), summary.summed_degradation.text(), tokens.text(1), share]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _full_pool_uniform(summaries: Sequence[ModeSummary]) -> ModeSummary | None:
    largest = max(len(s.pool) for s in summaries)
    return next((s for s in summaries if s.mode == "all_uniform" and len(s.pool) == largest), None)


def held_out_routing(config, selector_file: str | Path, texts: Sequence[str], domains: Sequence[str],
                     batch_size: int = 32) -> dict[str, dict[str, float]]:
    """What a run's trained selector chooses on held-out text: per domain and source, the share of the
    sequences for which that source would run (``route``: the selection rule without exploration).

    Args:
        config: the run's parsed config (target tokenizer, sources, selector settings).
        selector_file: the run's ``selector.pt`` (``GatePolicy.save``).
        texts, domains: held-out chunks that fit the target's ``data.max_length``.
    """
    import torch
    from transformers import AutoTokenizer

    from fusion.data import TextBatchCollator
    from fusion.policies import make_policy, tokenizer_families
    from fusion.vocab_map import tokenizer_sha256

    state = torch.load(selector_file, weights_only=False)
    names = [source.name for source in config.sources]
    if state["sources"] != names:
        raise ValueError(f"{selector_file} routes {state['sources']}, not the run's sources {names}")
    tokenizer = AutoTokenizer.from_pretrained(config.target)
    families = None
    if config.selector.distinct_tokenizers:
        families = tokenizer_families([tokenizer_sha256(AutoTokenizer.from_pretrained(source.path)) for source in config.sources])
    policy = make_policy(config, len(names), vocab_size=len(tokenizer), device=torch.device("cpu"), seed=0,
                         average_gradients=lambda gradients: None, sum_over_ranks=lambda value: value,
                         families=families)
    policy.load_state_dict(state)
    collate = TextBatchCollator(tokenizer, config.data.max_length)
    available = torch.ones(len(names), dtype=torch.bool)
    counts: dict[str, torch.Tensor] = {}
    totals: dict[str, int] = {}
    for start in range(0, len(texts), batch_size):
        rows = [{"text": text, "domain": domain} for text, domain in zip(texts[start:start + batch_size], domains[start:start + batch_size])]
        chosen = policy.route(collate(rows), available)
        for row, domain in zip(chosen, (r["domain"] for r in rows)):
            counts[domain] = counts.get(domain, torch.zeros(len(names))) + row.float()
            totals[domain] = totals.get(domain, 0) + 1
    return {domain: {name: float(counts[domain][s]) / totals[domain] for s, name in enumerate(names)} for domain in sorted(counts)}


def routing_markdown(summaries: Sequence[ModeSummary], truth: Mapping[str, Mapping[str, float]]) -> str:
    """Per (gate mode, pool) and domain: the ground truth's best source and the held-out routing shares."""
    lines = []
    for summary in summaries:
        if not summary.routing:
            continue
        best = best_sources(truth, summary.pool)
        lines += [f"Held-out routing of {summary.label} (share of each domain's held-out chunks a source runs for, "
                  f"seed mean; **bold**: the domain's best source by the ground truth)", "",
                  "| domain | best source (bpb) | " + " | ".join(summary.pool) + " |", "|---|---|" + "---|" * len(summary.pool)]
        for domain, shares in summary.routing.items():
            cells = [f"**{shares[name]:.0%}**" if name == best.get(domain) else f"{shares[name]:.0%}" for name in summary.pool]
            unseen = " (unseen)" if domain in summary.unseen else ""
            lines.append(f"| {domain}{unseen} | {best.get(domain)} ({truth[best[domain]][domain]:.3f}) | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def best_sources(truth: Mapping[str, Mapping[str, float]], pool: Sequence[str]) -> dict[str, str]:
    """Per domain of the ground truth (``{source: {domain: bpb}}``), the pool's source with the lowest bpb."""
    domains = sorted({domain for name in pool for domain in truth[name]})
    return {domain: min(pool, key=lambda name: truth[name].get(domain, float("inf"))) for domain in domains}


def check_bar(summaries: Sequence[ModeSummary], truth: Mapping[str, Mapping[str, float]], oracle_gap: float = 0.01,
              compute_ratio: float = 0.4, routing_share: float = 0.8) -> list[tuple[str, bool]]:
    """The bar for ``predictive`` on the full pool, each line with whether it holds (on seed means).

    1. the lowest mean held-out bpb of every mode but ``domain_oracle``;
    2. within ``oracle_gap`` of ``domain_oracle`` (or better);
    3. no training domain worse than ``none``;
    4. at most ``compute_ratio`` of ``all_uniform``'s source tokens;
    5. on the held-out chunks of each training domain, at least ``routing_share`` of the sequences go
       to (among others) the domain's best source by the ground truth ``truth``;
    6. on every unseen domain, no worse than ``none``.

    Raises:
        ValueError: the summaries lack ``predictive``, ``none`` or ``all_uniform`` on the full pool.
    """
    largest = max(len(s.pool) for s in summaries)
    full = {s.mode: s for s in summaries if len(s.pool) in (largest, 0)}
    missing = sorted({"predictive", "all_uniform", BASELINE_MODE} - set(full))
    if missing:
        raise ValueError(f"the bar needs {missing} runs on the full source pool")
    predictive, uniform, none = full["predictive"], full["all_uniform"], full[BASELINE_MODE]
    others = [s for s in full.values() if s.mode not in ("predictive", "domain_oracle")]
    best_other = min(others, key=lambda s: s.mean_bits_per_byte.mean)
    mean = predictive.mean_bits_per_byte.mean
    seen = [domain for domain in predictive.bits_per_byte if domain not in predictive.unseen]
    worse = [domain for domain in seen if predictive.bits_per_byte[domain].mean > none.bits_per_byte[domain].mean]
    lines = [(f"predictive has the lowest mean held-out bpb of every mode but domain_oracle ({mean:.4f}; next: "
              f"{best_other.label} {best_other.mean_bits_per_byte.mean:.4f})", mean < best_other.mean_bits_per_byte.mean)]
    if "domain_oracle" in full:
        oracle = full["domain_oracle"].mean_bits_per_byte.mean
        lines.append((f"predictive is within {oracle_gap} bpb of domain_oracle or better ({mean:.4f} vs {oracle:.4f})",
                      mean <= oracle + oracle_gap))
    lines.append((f"predictive degrades no training domain against none (worse: {worse or 'none'})", not worse))
    lines.append((f"predictive's source tokens {predictive.source_tokens.mean:.0f} <= {compute_ratio} x all_uniform's "
                  f"{uniform.source_tokens.mean:.0f}", predictive.source_tokens.mean <= compute_ratio * uniform.source_tokens.mean))
    if predictive.routing:
        best = best_sources(truth, predictive.pool)
        shares = {domain: predictive.routing[domain][best[domain]] for domain in seen if domain in predictive.routing}
        text = ", ".join(f"{domain} -> {best[domain]} {share:.0%}" for domain, share in shares.items())
        lines.append((f"on held-out text of each training domain >= {routing_share:.0%} of sequences go to its best source "
                      f"({text})", bool(shares) and min(shares.values()) >= routing_share))
    for domain in predictive.unseen:
        ours, base = predictive.bits_per_byte[domain].mean, none.bits_per_byte[domain].mean
        lines.append((f"on the unseen domain {domain} predictive is no worse than none ({ours:.4f} vs {base:.4f})", ours <= base))
    return lines


def plot_comparison(summaries: Sequence[ModeSummary], out_dir: str | Path) -> list[Path]:
    """Three small PNGs: per-domain bpb by mode (full pool), interference by mode and pool size, source compute.

    Bars are seed means; error bars span the lowest to the highest seed.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on training machines
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    largest = max(len(s.pool) for s in summaries)
    full = [s for s in summaries if len(s.pool) in (largest, 0)]
    paths = []

    domains = list(full[0].bits_per_byte)
    figure, axis = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(full)
    for offset, summary in enumerate(full):
        spreads = [summary.bits_per_byte[d] for d in domains]
        positions = np.arange(len(domains)) + (offset - (len(full) - 1) / 2) * width
        axis.bar(positions, [s.mean for s in spreads], width, yerr=_error_bars(spreads), label=summary.label, capsize=2)
    low = min(s.low for summary in full for s in summary.bits_per_byte.values())
    high = max(s.high for summary in full for s in summary.bits_per_byte.values())
    axis.set_ylim(low - 0.1 * (high - low) - 0.01, high + 0.05 * (high - low) + 0.01)
    axis.set_xticks(np.arange(len(domains)), domains)
    axis.set_ylabel("held-out bits per byte")
    axis.set_title("Per-domain held-out bpb by mode (lower is better)")
    axis.legend(fontsize=7, ncols=3)
    paths.append(_save(figure, out_dir / "bpb_by_mode.png"))

    fused = [s for s in summaries if s.mode != BASELINE_MODE]
    figure, (by_mode, by_pool) = plt.subplots(1, 2, figsize=(9, 3.4))
    full_fused = [s for s in fused if len(s.pool) == largest]
    by_mode.bar([s.mode for s in full_fused], [s.summed_degradation.mean for s in full_fused],
                yerr=_error_bars([s.summed_degradation for s in full_fused]), capsize=3)
    for index, summary in enumerate(full_fused):
        by_mode.annotate(f"{summary.degraded.mean:g} dom.", (index, summary.summed_degradation.mean), ha="center",
                         va="bottom", fontsize=7)
    by_mode.set_ylabel("summed degradation vs none (bpb)")
    by_mode.set_title(f"Interference by mode ({largest} sources)")
    by_mode.tick_params(axis="x", labelrotation=30, labelsize=7)
    pooled = [mode for mode in dict.fromkeys(s.mode for s in fused) if sum(s.mode == mode for s in fused) > 1]
    for mode in pooled:
        rows = sorted((s for s in fused if s.mode == mode), key=lambda s: len(s.pool))
        by_pool.errorbar([len(s.pool) for s in rows], [s.summed_degradation.mean for s in rows],
                         yerr=_error_bars([s.summed_degradation for s in rows]), marker="o", capsize=3, label=mode)
    by_pool.set_xlabel("sources in the pool")
    by_pool.set_ylabel("summed degradation vs none (bpb)")
    by_pool.set_title("Interference by pool size")
    if pooled:
        by_pool.legend(fontsize=7)
    paths.append(_save(figure, out_dir / "interference.png"))

    figure, axis = plt.subplots(figsize=(6, 3.2))
    axis.bar([s.label for s in fused], [s.source_tokens.mean / 1e3 for s in fused],
             yerr=_error_bars([Spread(s.source_tokens.mean / 1e3, s.source_tokens.low / 1e3, s.source_tokens.high / 1e3)
                               for s in fused]), capsize=3)
    axis.set_ylabel("source tokens requested (k)")
    axis.set_title("Source compute by mode")
    axis.tick_params(axis="x", labelrotation=35, labelsize=7)
    paths.append(_save(figure, out_dir / "source_compute.png"))
    return paths


def _error_bars(spreads: Sequence[Spread]) -> np.ndarray:
    """``[2, n]`` distances from the mean to the lowest and highest seed (matplotlib's ``yerr``)."""
    return np.array([[s.mean - s.low for s in spreads], [s.high - s.mean for s in spreads]])


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path
