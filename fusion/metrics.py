"""One logger for the run (console lines and TensorBoard, written by the logging rank only) and the run's result.

Metric names are namespaced: ``loss/*``, ``optim/*``, ``perf/*``, ``eval/<domain>/*``,
``select/*`` and ``source/<name>/*``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
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
    eval_before: dict  # the same held-out metrics before this run's first step ({} when resumed)
    routing: dict
    sources: dict
    model_dir: str
    tensorboard_dir: str
    step_seconds: list  # wall time of every step of this run


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
