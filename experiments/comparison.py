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
from dataclasses import dataclass
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
    """What one finished run measured: held-out bpb per domain and source tokens requested per source."""

    spec: RunSpec
    bits_per_byte: Mapping[str, float]
    source_tokens: Mapping[str, int]

    @property
    def mean_bits_per_byte(self) -> float:
        """Unweighted mean over domains (every domain counts the same, however many bytes it has)."""
        return statistics.fmean(value for domain, value in self.bits_per_byte.items() if domain != "all")


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

    @property
    def label(self) -> str:
        return self.mode if self.mode == BASELINE_MODE else f"{self.mode} ({len(self.pool)} src)"


def summarise(outcomes: Sequence[RunOutcome], tolerance: float = 0.0) -> list[ModeSummary]:
    """Group runs by (mode, pool), in first-seen order, with interference against ``none`` of the same seed.

    Raises:
        ValueError: some seed has fused runs but no ``none`` run.
    """
    baselines = {o.spec.seed: o.bits_per_byte for o in outcomes if o.spec.mode == BASELINE_MODE}
    groups: dict[tuple[str, tuple[str, ...]], list[RunOutcome]] = {}
    for outcome in outcomes:
        if outcome.spec.seed not in baselines:
            raise ValueError(f"seed {outcome.spec.seed} has no '{BASELINE_MODE}' run to measure interference against")
        groups.setdefault((outcome.spec.mode, outcome.spec.sources), []).append(outcome)
    summaries = []
    for (mode, pool), runs in groups.items():
        measured = [interference(run.bits_per_byte, baselines[run.spec.seed], tolerance) for run in runs]
        domains = [domain for domain in runs[0].bits_per_byte if domain != "all"]
        summaries.append(ModeSummary(
            mode, pool, tuple(run.spec.seed for run in runs),
            {domain: Spread.of(run.bits_per_byte[domain] for run in runs) for domain in domains},
            Spread.of(run.mean_bits_per_byte for run in runs),
            Spread.of(m.degraded for m in measured),
            Spread.of(m.summed for m in measured),
            Spread.of(sum(run.source_tokens.values()) for run in runs),
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


def check_bar(summaries: Sequence[ModeSummary], interference_ratio: float = 0.5, compute_ratio: float = 0.6) -> list[tuple[str, bool]]:
    """The issue's bar for ``predictive`` on the full pool, each line with whether it holds (on seed means).

    Raises:
        ValueError: the summaries lack ``predictive`` or ``all_uniform`` on the full pool.
    """
    largest = max(len(s.pool) for s in summaries)
    full = {s.mode: s for s in summaries if len(s.pool) in (largest, 0)}
    if "predictive" not in full or "all_uniform" not in full:
        raise ValueError("the bar needs predictive and all_uniform runs on the full source pool")
    predictive, uniform = full["predictive"], full["all_uniform"]
    best = min(full.values(), key=lambda s: s.mean_bits_per_byte.mean)
    lowest = (f"predictive has the lowest mean held-out bpb of all modes ({predictive.mean_bits_per_byte.mean:.4f}; "
              f"lowest: {best.label} {best.mean_bits_per_byte.mean:.4f})")
    summed = (f"predictive's summed degradation {predictive.summed_degradation.mean:.4f} <= {interference_ratio} x "
              f"all_uniform's {uniform.summed_degradation.mean:.4f}")
    degraded = (f"predictive's degraded domains {predictive.degraded.mean:.1f} <= {interference_ratio} x all_uniform's "
                f"{uniform.degraded.mean:.1f}")
    compute = (f"predictive's source tokens {predictive.source_tokens.mean:.0f} <= {compute_ratio} x all_uniform's "
               f"{uniform.source_tokens.mean:.0f}")
    return [
        (lowest, best.mode == "predictive"),
        (summed, predictive.summed_degradation.mean <= interference_ratio * uniform.summed_degradation.mean),
        (degraded, predictive.degraded.mean <= interference_ratio * uniform.degraded.mean),
        (compute, predictive.source_tokens.mean <= compute_ratio * uniform.source_tokens.mean),
    ]


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
