"""One logger for the run (console lines and TensorBoard, written by the logging rank only) and the run's result.

Metric names are namespaced: ``loss/*``, ``optim/*``, ``perf/*``, ``data/*``, ``eval/<domain>/*``,
``select/*`` and ``source/<name>/*``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

logger = logging.getLogger("fusion")


@dataclass(frozen=True)
class TrainResult:
    """What a training run did (``<output_dir>/result.json``)."""

    steps: int
    tokens: int
    seconds: float
    first_loss: float  # mean of the first (up to) 5 steps
    final_loss: float  # mean of the last (up to) 5 steps
    eval: dict
    eval_before: dict  # the same held-out metrics before the run's first step
    routing: dict
    sources: dict
    model_dir: str
    tensorboard_dir: str
    step_seconds: list  # wall time of every step of the run


@dataclass
class RunProgress:
    """What the run did so far, over every invocation of it: a resumed run's checkpoint carries it on,
    so that the result and the summary cover the whole run, not just its last part."""

    tokens: int = 0
    seconds: float = 0.0  # training time of the earlier invocations (this one's is added at the end)
    losses: list = field(default_factory=list)
    step_seconds: list = field(default_factory=list)
    eval_before: dict = field(default_factory=dict)
    sources: list = field(default_factory=list)  # per source, this rank's counters (``SourceCounters`` fields)

    def add_step(self, loss: float, tokens: int, seconds: float) -> None:
        self.losses.append(loss)
        self.tokens += tokens
        self.step_seconds.append(round(seconds, 4))

    def loss_window(self, first: bool) -> float:
        """Mean loss of the first (or last) up to 5 steps; NaN when no step was trained."""
        window = self.losses[:5] if first else self.losses[-5:]
        return sum(window) / len(window) if window else float("nan")


def data_scalars(packing) -> dict[str, float]:
    """``data/utilisation`` (and ``data/utilisation/<domain>``): real target tokens per slot of the training
    rows, ``packing`` being their ``fusion.packing.PackReport``. ``perf/utilisation`` is each step's own
    (real tokens over the padded micro-batches' slots)."""
    return {"data/utilisation": packing.utilisation,
            **{f"data/utilisation/{domain}": value for domain, value in packing.domain_utilisation().items()}}


def eval_scalars(evaluation: dict[str, dict]) -> dict[str, float]:
    """``eval/<domain>/{loss,perplexity,bits_per_byte}`` of a per-domain held-out result."""
    return {f"eval/{domain}/{key}": value for domain, row in evaluation.items()
            for key, value in row.items() if key in ("loss", "perplexity", "bits_per_byte")}


class MetricsLogger:
    def __init__(self, log_dir: Path, enabled: bool):
        self.log_dir = Path(log_dir)
        self.enabled = enabled
        self.writer = SummaryWriter(str(self.log_dir)) if enabled else None
        if enabled and not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("[fusion %(asctime)s] %(message)s", "%H:%M:%S"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False

    def info(self, message: str) -> None:
        if self.enabled:
            logger.info(message)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def text(self, tag: str, text: str) -> None:
        """A text panel in TensorBoard (shown as Markdown: kept verbatim in a code block)."""
        if self.writer is not None:
            self.writer.add_text(tag, "```\n" + text + "\n```", 0)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
