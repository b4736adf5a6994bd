"""One YAML file per run, parsed into frozen dataclasses and validated before any process starts.

Every error is a ``ConfigError`` whose message names the key (dotted path), the value and the
fix. Unknown keys are errors (with a close match suggested), never ignored. Single keys can be
overridden from the command line: ``--set trainer.lr=1e-4`` (the value is parsed as YAML).

Relative paths in the file are resolved against the directory the command runs in (the
repository root in the README's commands).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# The fusion modes, one ``fusion.policies`` class each (``fusion.policies.POLICIES``). The reference
# policies route by the sources' known held-out quality (``fusion.ground_truth``): yardsticks for the
# modes that cannot see it.
REFERENCE_MODES = ("domain_oracle", "best_single", "static_top_k")
FUSION_MODES = ("none", "min_ce", "avg_ce", "all_uniform", "scores", "predictive", *REFERENCE_MODES)
FusionMode = Literal[FUSION_MODES]
Precision = Literal["fp32", "bf16", "fp16"]
# Hugging Face attention implementations a model is loaded with (``attn_implementation``).
Attention = Literal["sdpa", "flash_attention_2", "eager"]


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/run"
    seed: int = 1234
    cache_dir: str = ".cache/fusion"  # chunked corpora and vocabulary maps, reused across runs


@dataclass(frozen=True)
class SourceConfig:
    name: str
    path: str
    replicas: int = 1
    tensor_parallel: int = 1
    dtype: Precision = "fp32"  # weights and activations of the source's forward; on GPU use bf16
    attention: Attention = "sdpa"
    batch_size: int = 8


@dataclass(frozen=True)
class TopologyConfig:
    placement: Literal["colocated", "disaggregated"] = "colocated"
    trainer_ranks: int = 1
    prefetch_steps: int = 1  # disaggregated: requests for step t+k go out while step t trains (k <= prefetch_steps)
    request_timeout_s: float = 300.0  # disaggregated: longest wait for one source reply before the source is marked down
    startup_timeout_s: float = 1800.0  # disaggregated: longest wait for a source group to load its model and say ready
    collective_timeout_s: float = 600.0  # longest wait in one trainer collective: a hung trainer rank ends the run after it
    finish_grace_s: float = 30.0  # after training, how long a source rank that has not stopped gets before it ends itself


@dataclass(frozen=True)
class DataConfig:
    # A file or folder: JSON Lines / JSON, Parquet, CSV or text files, or a datasets save_to_disk
    # Dataset / DatasetDict (fusion.data). Without an eval split, one is carved out of the rows.
    corpus: str = "assets/corpus"
    text_field: str = "text"
    domain_field: str | None = None  # None: "domain" when the corpus has it, else one domain "all"
    train_split: str = "train"
    eval_split: str = "validation"
    max_length: int = 128
    # Fill each training row with several documents (of one domain) up to max_length target tokens;
    # labels, soft labels and attention stay within documents (fusion.packing). Off by default: the
    # sources are then chosen per document, not per packed row.
    packing: bool = False
    # With packing: a chunk that no row holds whole is cut in its text (at a word start) into pieces of
    # at least this many target tokens that fill the rows; each piece is a document of its own and
    # offline answers are stored per piece. null: rows of whole chunks (offline answers per chunk).
    min_piece_tokens: int | None = 16
    domains: tuple[str, ...] | None = None
    max_train_chunks: int | None = None
    max_eval_chunks: int | None = None
    # Seed of the max_train/eval_chunks samples; None: run.seed. Fixing it keeps one data subset
    # (and one offline precompute) across runs of different seeds.
    subset_seed: int | None = None


@dataclass(frozen=True)
class TrainerConfig:
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_steps: int = 100
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # bf16 / fp16: the target's weights, activations and gradients in 16 bits, fp32 master weights and
    # optimizer state in DeepSpeed (its ``bf16`` / ``fp16`` sections); fp32: everything in fp32 (the CPU
    # default). On GPU use bf16.
    precision: Precision = "fp32"
    attention: Attention = "sdpa"  # the target's attention implementation
    activation_checkpointing: bool = False  # recompute each decoder layer's activations in backward
    deepspeed_config: str = "ds_configs/zero3.json"  # ds_configs/zero3_offload.json: parameters and optimizer on CPU
    # Positions per chunk of the LM head in the fused loss, or "auto": as many as fit loss_memory_mb
    # (fusion.loss.auto_chunk_size).
    loss_chunk_size: int | Literal["auto"] = 1024
    loss_memory_mb: float = 1024.0  # what one chunk of the LM head may hold, for loss_chunk_size: auto
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 8
    checkpoint_every: int = 0  # optimizer steps between DeepSpeed checkpoints in <output_dir>/checkpoints; 0: none
    resume: bool = True  # continue from the newest complete checkpoint in <output_dir>/checkpoints; false: start over
    keep_last: int | None = None  # complete checkpoints kept after each save; None: all
    num_threads: int | None = None


@dataclass(frozen=True)
class FusionConfig:
    mode: FusionMode = "none"
    lam: float = 0.9
    top_k: int = 10
    temperature: float = 1.0
    sharpen_temperature: float | None = None  # T_s: sharpen the gate weights by realised scores; null: no sharpening
    answers_dir: str = "answers"  # where launch/precompute.py writes offline sparse answers
    offline: bool = False  # read sources' answers from answers_dir instead of running the models
    # Reference modes: `launch/evaluate.py --sources` JSON, the sources' held-out bits per byte per domain.
    ground_truth: str | None = None
    static_k: int = 2  # static_top_k: how many of the best sources (by mean held-out bpb) every sequence gets


@dataclass(frozen=True)
class ExplorationConfig:
    start: float = 0.2
    end: float = 0.05
    decay_steps: int = 1000  # optimizer steps from start to end; the rate stays at end afterwards
    schedule: Literal["linear", "exponential", "constant"] = "linear"
    measure_steps: int = 4  # the first optimizer steps ask every available source (predictive's warm-up)


@dataclass(frozen=True)
class SelectorConfig:
    # Defaults: the settings of the comparison in docs/RESULTS.md ("Real specialists").
    tau: float = 0.3  # gate-probability threshold of the selection rule
    objective: Literal["ranking", "regression", "linucb"] = "linucb"  # what the predictive gate learns (fusion.selection)
    # At least this many sources per sequence (the top ones by the gate); null: two where the pool
    # and max_sources allow (``sources_at_least``). Two good sources beat one on the same budget.
    min_sources: int | None = None
    max_sources: int | None = 2
    # The chosen sources of a sequence come from distinct tokenizers where the pool has enough
    # (``fusion.selection.select``): two sources with one tokenizer answer at the same positions.
    distinct_tokenizers: bool = True
    beta: float = 0.0
    lr: float = 2e-2  # the selector's AdamW
    # linucb: the width of its fixed random projection of the ids (256 routes the comparison's pool
    # best: docs/RESULTS.md); regression, ranking: the learned embedding's.
    embedding_dim: int = 256
    hidden_dim: int = 128
    # T_gate: softmax(-scores / T_gate), realised (scores) or predicted (predictive); 1.0 keeps the
    # weights among the chosen near equal, tilted towards the better score.
    gate_temperature: float = 1.0
    target_temperature: float = 1.0  # T of the selector loss's target, softmax(-realised nll_per_byte / T)
    # linucb: training chooses by predicted score - optimism * confidence width; ridge: the prior's
    # strength; correlation: of two sources' scores on one sequence, whose difficulty moves both
    # (fusion.selection.RidgeSelector).
    optimism: float = 0.3
    ridge: float = 1.0
    correlation: float = 0.5
    exploration: ExplorationConfig = field(default_factory=ExplorationConfig)

    def sources_at_least(self, num_sources: int) -> int:
        """The selection rule's minimum for a pool of ``num_sources``: ``min_sources``, or by default
        ``min(2, max_sources, num_sources)``."""
        if self.min_sources is not None:
            return self.min_sources
        return max(1, min(2, self.max_sources or num_sources, num_sources))


@dataclass(frozen=True)
class Config:
    """A whole run. ``sources`` is a list: any number of sources, in rank-assignment order."""

    target: str
    run: RunConfig = field(default_factory=RunConfig)
    sources: tuple[SourceConfig, ...] = ()
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


# ---------------------------------------------------------------------------------------------
# Parsing: mapping -> typed dataclasses, with the dotted key in every error.


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _convert(annotation: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(annotation)
        if value is None and type(None) in arms:
            return None
        errors = []
        for arm in arms:
            if arm is type(None):
                continue
            try:
                return _convert(arm, value, key)
            except ConfigError as error:
                errors.append(error)
        raise errors[0] if len(errors) == 1 else ConfigError(f"{key}: expected {_type_name(annotation)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type, _ellipsis) = typing.get_args(annotation)
        return tuple(_convert(item_type, item, f"{key}[{index}]") for index, item in enumerate(value))
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        # YAML reads 1e-4 (no dot) as a string; accept numeric strings so users need not write 1.0e-4.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} at {key}")


def _build(cls: type, mapping: Any, prefix: str) -> Any:
    where = prefix or "the config file"
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in mapping:
        if key not in fields:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{dotted}: unknown key{hint}")
    values = {}
    for name, spec in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name in mapping:
            values[name] = _convert(hints[name], mapping[name], dotted)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{dotted}: required key is missing")
    return cls(**values)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (value parsed as YAML) to the raw mapping, in order."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. trainer.lr=1e-4")
        dotted, text = override.split("=", 1)
        parts = dotted.strip().split(".")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {'.'.join(parts[:depth + 1])} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(text)
    return raw


# ---------------------------------------------------------------------------------------------
# Semantic checks: values each fine alone but impossible for a run.


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Any one of these sets lets AutoTokenizer build a fast tokenizer without a hub.
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",))
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def model_config(key: str, path: str) -> dict:
    """The parsed ``config.json`` of the model folder named by config key ``key``.

    Raises:
        ConfigError: no such folder, no ``config.json``, or one that is not a JSON object.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{key}: model directory {path!r} does not exist; run `make assets` or fix the path")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{key}: {path!r} has no config.json; it must be a Hugging Face model directory (save_pretrained)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{key}: {config_file} is not valid JSON ({error}); re-save the model with save_pretrained") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{key}: {config_file} is not a JSON object; re-save the model with save_pretrained")
    return config


def _find(config: dict, keys: tuple[str, ...]) -> int | None:
    """The first of ``keys`` in the config or its ``text_config`` (multimodal wrappers), if any is an int."""
    for section in (config, config.get("text_config") or {}):
        for name in keys:
            if isinstance(section.get(name), int):
                return section[name]
    return None


def _check_model_dir(key: str, path: str, max_length: int, top_k: int | None = None) -> None:
    """Check a model folder from its files alone, before any weights load: a readable ``config.json``,
    weights, the files of a fast tokenizer, ``data.max_length`` within its context and (for a source,
    ``top_k``) ``fusion.top_k`` within its vocabulary."""
    config = model_config(key, path)
    folder = Path(path)
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(f"{key}: {path!r} has no weights (one of {', '.join(WEIGHT_FILES)}); "
                          "save the model with save_pretrained into this folder")
    if not any(all((folder / name).is_file() for name in files) for files in TOKENIZER_FILES):
        wanted = " or ".join("+".join(files) for files in TOKENIZER_FILES)
        raise ConfigError(f"{key}: {path!r} has no tokenizer files ({wanted}); save the model's tokenizer with "
                          "save_pretrained into the same folder")
    vocab_size = _find(config, ("vocab_size",))
    if top_k is not None and vocab_size is not None and top_k > vocab_size:
        raise ConfigError(f"fusion.top_k: {top_k} exceeds the vocabulary of {key} ({path!r}: {vocab_size} tokens); "
                          f"use at most {vocab_size}")
    context = _find(config, CONTEXT_KEYS)
    if context is not None and max_length > context:
        raise ConfigError(f"data.max_length: {max_length} tokens exceed the context of {key} ({path!r}: {context}); "
                          f"use at most {context}")


def read_ground_truth(path: str) -> dict[str, dict[str, float]]:
    """``{source: {domain: bits per byte}}`` from a ``launch/evaluate.py`` JSON (``{"models": {name: {domain:
    {"bits_per_byte": ...}}}}``); the pooled ``all`` row is left out.

    Raises:
        ConfigError: the file is missing or not of that shape.
    """
    try:
        models = json.loads(Path(path).read_text())["models"]
        return {name: {domain: float(row["bits_per_byte"]) for domain, row in domains.items() if domain != "all"}
                for name, domains in models.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"fusion.ground_truth: {path!r} is not a launch/evaluate.py JSON ({type(error).__name__}: {error}); "
                          "write it with `launch/evaluate.py --config <this config> --sources --out <file>`") from None


def _check_ground_truth(path: str, sources: list[str]) -> None:
    missing = sorted(set(sources) - set(read_ground_truth(path)))
    _check(not missing, f"fusion.ground_truth: {path!r} has no scores of sources {missing}; evaluate them with "
                        "`launch/evaluate.py --config <this config> --sources --out <file>`")


def _check_attention(section: str, attention: str, dtype: str, dtype_key: str) -> None:
    """``flash_attention_2`` needs the flash-attn package (a CUDA build) and 16-bit weights."""
    if attention != "flash_attention_2":
        return
    import importlib.util

    _check(importlib.util.find_spec("flash_attn") is not None,
           f"{section}.attention: 'flash_attention_2' needs the flash-attn package, which is not installed; "
           "`pip install flash-attn --no-build-isolation` on a CUDA machine, or use 'sdpa'")
    _check(dtype in ("bf16", "fp16"), f"{section}.attention: 'flash_attention_2' runs in bf16 or fp16 only, but "
                                      f"{dtype_key} is {dtype!r}; set {dtype_key}: bf16, or use 'sdpa'")


def validate(config: Config, check_paths: bool = True) -> Config:
    """Check value ranges and cross-field rules; with ``check_paths`` also that files exist."""
    trainer, fusion, selector, topology = config.trainer, config.fusion, config.selector, config.topology
    _check(trainer.lr > 0, f"trainer.lr: must be > 0, got {trainer.lr}")
    _check(0 <= trainer.min_lr_ratio <= 1, f"trainer.min_lr_ratio: must be in [0, 1], got {trainer.min_lr_ratio}")
    _check(trainer.weight_decay >= 0, f"trainer.weight_decay: must be >= 0, got {trainer.weight_decay}")
    _check(trainer.grad_clip >= 0, f"trainer.grad_clip: must be >= 0 (0 disables clipping), got {trainer.grad_clip}")
    for key in ("micro_batch_size", "gradient_accumulation_steps", "max_steps", "log_every", "eval_batches"):
        _check(getattr(trainer, key) >= 1, f"trainer.{key}: must be >= 1, got {getattr(trainer, key)}")
    _check(trainer.loss_chunk_size == "auto" or trainer.loss_chunk_size >= 1,
           f"trainer.loss_chunk_size: must be >= 1 or 'auto', got {trainer.loss_chunk_size}")
    _check(trainer.loss_memory_mb > 0, f"trainer.loss_memory_mb: must be > 0 MB, got {trainer.loss_memory_mb}")
    _check_attention("trainer", trainer.attention, trainer.precision, "trainer.precision")
    _check(trainer.warmup_steps >= 1, f"trainer.warmup_steps: must be >= 1 (DeepSpeed's WarmupCosineLR needs at least one "
                                      f"warmup step), got {trainer.warmup_steps}")
    _check(trainer.checkpoint_every >= 0, f"trainer.checkpoint_every: must be >= 0 (0 disables checkpoints), got {trainer.checkpoint_every}")
    _check(trainer.eval_every >= 0, f"trainer.eval_every: must be >= 0 (0 evaluates only at the end), got {trainer.eval_every}")
    _check(trainer.keep_last is None or trainer.keep_last >= 1,
           f"trainer.keep_last: must be >= 1 (checkpoints kept) or null (keep all), got {trainer.keep_last}")
    _check(trainer.num_threads is None or trainer.num_threads >= 1, f"trainer.num_threads: must be >= 1 or null, got {trainer.num_threads}")
    _check(config.data.max_length >= 8, f"data.max_length: must be >= 8 tokens, got {config.data.max_length}")
    for key in ("max_train_chunks", "max_eval_chunks"):
        value = getattr(config.data, key)
        _check(value is None or value >= 1, f"data.{key}: must be >= 1 or null, got {value}")
    data = config.data
    _check(data.min_piece_tokens is None or data.min_piece_tokens >= 1,
           f"data.min_piece_tokens: must be >= 1 or null (pack whole chunks), got {data.min_piece_tokens}")
    _check(not data.packing or data.min_piece_tokens is None or 2 * data.min_piece_tokens <= data.max_length,
           f"data.min_piece_tokens: {data.min_piece_tokens} leaves no cut in rows of data.max_length={data.max_length} tokens "
           f"(a cut makes two pieces of at least that many); use at most {data.max_length // 2}, or null to pack whole chunks")
    _check(bool(data.text_field), "data.text_field: must name the field holding the text, got ''")
    _check(data.domain_field != "", "data.domain_field: must name a field, or be null (a 'domain' field if there is one, else one domain)")
    _check(data.domain_field != data.text_field, f"data.domain_field: {data.domain_field!r} is also data.text_field; name the field holding the domain label")
    _check(data.eval_split != data.train_split, f"data.eval_split: {data.eval_split!r} is also data.train_split; name another split (it is carved out of the corpus when missing)")
    _check(topology.trainer_ranks >= 1, f"topology.trainer_ranks: must be >= 1, got {topology.trainer_ranks}")
    _check(topology.prefetch_steps >= 0, f"topology.prefetch_steps: must be >= 0 (0: no overlap), got {topology.prefetch_steps}")
    for key in ("request_timeout_s", "startup_timeout_s", "collective_timeout_s", "finish_grace_s"):
        _check(getattr(topology, key) > 0, f"topology.{key}: must be > 0 seconds, got {getattr(topology, key)}")
    _check(fusion.static_k >= 1, f"fusion.static_k: must be >= 1, got {fusion.static_k}")
    _check(fusion.mode not in REFERENCE_MODES or fusion.ground_truth is not None,
           f"fusion.ground_truth: mode {fusion.mode!r} routes by the sources' held-out bpb; point it at the JSON of "
           "`launch/evaluate.py --config <this config> --sources --out <file>`")
    _check(not (fusion.offline and topology.placement == "disaggregated"),
           "fusion.offline: offline answers are read by the trainer; use placement: colocated (no source ranks)")

    _check(0 <= fusion.lam <= 1, f"fusion.lam: must be in [0, 1] (weight of the LM loss), got {fusion.lam}")
    _check(fusion.top_k >= 1, f"fusion.top_k: must be >= 1, got {fusion.top_k}")
    _check(fusion.temperature > 0, f"fusion.temperature: must be > 0, got {fusion.temperature}")
    _check(fusion.sharpen_temperature is None or fusion.sharpen_temperature > 0,
           f"fusion.sharpen_temperature: must be > 0 or null (no sharpening), got {fusion.sharpen_temperature}")
    _check(0 < selector.tau < 1, f"selector.tau: must be in (0, 1), got {selector.tau}")
    _check(selector.beta >= 0, f"selector.beta: must be >= 0, got {selector.beta}")
    _check(selector.lr > 0, f"selector.lr: must be > 0, got {selector.lr}")
    _check(selector.embedding_dim >= 1, f"selector.embedding_dim: must be >= 1, got {selector.embedding_dim}")
    _check(selector.hidden_dim >= 1, f"selector.hidden_dim: must be >= 1, got {selector.hidden_dim}")
    _check(selector.optimism >= 0, f"selector.optimism: must be >= 0 (0: choose by the predicted score alone), got {selector.optimism}")
    _check(0 <= selector.correlation < 1,
           f"selector.correlation: must be in [0, 1) (0: the scores of one sequence are independent), got {selector.correlation}")
    for key in ("gate_temperature", "target_temperature", "ridge"):
        _check(getattr(selector, key) > 0, f"selector.{key}: must be > 0, got {getattr(selector, key)}")
    exploration = selector.exploration
    for key in ("start", "end"):
        value = getattr(exploration, key)
        _check(0 <= value <= 1, f"selector.exploration.{key}: must be in [0, 1], got {value}")
    _check(exploration.measure_steps >= 0, f"selector.exploration.measure_steps: must be >= 0, got {exploration.measure_steps}")
    _check(exploration.decay_steps >= 1, f"selector.exploration.decay_steps: must be >= 1, got {exploration.decay_steps}")
    _check(exploration.schedule != "exponential" or (exploration.start > 0 and exploration.end > 0),
           "selector.exploration.schedule: 'exponential' needs start > 0 and end > 0; use 'linear' to decay to 0")

    names = [source.name for source in config.sources]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    _check(not duplicates, f"sources: duplicate source name(s) {duplicates}; each source needs its own name")
    for index, source in enumerate(config.sources):
        key = f"sources[{index}]"
        _check(source.name.replace("-", "_").isidentifier(), f"{key}.name: {source.name!r} must be letters, digits, '-' or '_'")
        for attribute in ("replicas", "tensor_parallel", "batch_size"):
            value = getattr(source, attribute)
            _check(value >= 1, f"{key}.{attribute}: must be >= 1, got {value}")
        _check_attention(key, source.attention, source.dtype, f"{key}.dtype")
    if fusion.mode == "none":
        _check(topology.placement == "colocated" or not config.sources,
               "fusion.mode: 'none' trains without sources; remove `sources` or use placement: colocated")
    else:
        _check(bool(config.sources), f"fusion.mode: {fusion.mode!r} needs at least one entry under `sources`")
    if selector.min_sources is not None:
        _check(selector.min_sources >= 1, f"selector.min_sources: must be >= 1 or null (two where possible), got {selector.min_sources}")
    if selector.max_sources is not None:
        _check(selector.max_sources >= 1, f"selector.max_sources: must be >= 1 or null, got {selector.max_sources}")
        if selector.min_sources is not None:
            _check(selector.max_sources >= selector.min_sources,
                   f"selector.max_sources: {selector.max_sources} is below selector.min_sources ({selector.min_sources})")
    if config.sources and selector.min_sources is not None:
        _check(selector.min_sources <= len(config.sources),
               f"selector.min_sources: {selector.min_sources} exceeds the number of sources ({len(config.sources)})")

    if check_paths:
        _check_model_dir("target", config.target, config.data.max_length)
        for index, source in enumerate(config.sources):
            _check_model_dir(f"sources[{index}].path", source.path, config.data.max_length, fusion.top_k)
        _check(Path(config.data.corpus).exists(),
               f"data.corpus: {config.data.corpus!r} does not exist; run `make assets` or point it at your corpus "
               "(.jsonl/.json, .parquet, .csv or .txt files, a folder of them, or a datasets save_to_disk folder)")
        if fusion.mode in REFERENCE_MODES:
            _check_ground_truth(fusion.ground_truth, [source.name for source in config.sources])
        _check(Path(trainer.deepspeed_config).is_file(),
               f"trainer.deepspeed_config: {trainer.deepspeed_config!r} does not exist; use one of ds_configs/*.json")
        from fusion.data import check_corpus  # here: it imports datasets and torch, which config parsing alone needs not

        check_corpus(config.data.corpus, config.data.text_field, config.data.domain_field)
    return config


def parse_config(raw: Any, overrides: list[str] | None = None, check_paths: bool = True) -> Config:
    """Typed, validated config from a raw mapping (as read from YAML) plus ``--set`` overrides."""
    raw = dict(raw) if isinstance(raw, dict) else raw
    if overrides:
        raw = apply_overrides(raw if isinstance(raw, dict) else {}, overrides)
    return validate(_build(Config, raw, ""), check_paths=check_paths)


def load_config(path: str | Path, overrides: list[str] | None = None, check_paths: bool = True) -> Config:
    """Read, override, type and validate a run config.

    Raises:
        ConfigError: the file is missing or not YAML, a key is unknown, a value has the wrong
            type or is impossible, or (``check_paths``) a model/corpus/DeepSpeed path is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_config(raw, overrides, check_paths=check_paths)


def config_text(config: Config) -> str:
    """The resolved config (defaults filled in) as YAML."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config next to the run's outputs."""
    Path(path).write_text(config_text(config))
