"""Where the sequences went: per domain and source, how often a source ran and its mean fusion weight."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


class Routing:
    """Cumulative routing counters of this rank, ``[domain, source]``.

    Args:
        domains: the training split's domains (sorted).
        source_names: the S sources, in config order.
    """

    def __init__(self, domains: Sequence[str], source_names: Sequence[str]):
        self.domains = list(domains)
        self.names = list(source_names)
        self.ran = torch.zeros(len(self.domains), len(self.names), dtype=torch.float64)
        self.weight = torch.zeros(len(self.domains), len(self.names), dtype=torch.float64)
        self.sequences = torch.zeros(len(self.domains), dtype=torch.float64)

    def count(self, domains: Sequence[str], ran: torch.Tensor, weights: torch.Tensor) -> None:
        """Add one micro-batch: ``ran`` ``[B, S]`` bool, ``weights`` ``[B, S]`` fusion weights."""
        for row, domain in enumerate(domains):
            index = self.domains.index(domain)
            self.sequences[index] += 1
            self.ran[index] += ran[row].double()
            self.weight[index] += weights[row].double()

    def scalars(self) -> dict[str, float]:
        """This rank's selection rates and weights so far, overall and per domain (TensorBoard)."""
        scalars = {}
        sequences = self.sequences.clamp(min=1)
        for s, name in enumerate(self.names):
            scalars[f"select/rate/{name}"] = float(self.ran[:, s].sum() / sequences.sum())
            for d, domain in enumerate(self.domains):
                scalars[f"select/rate/{domain}/{name}"] = float(self.ran[d, s] / sequences[d])
                scalars[f"select/weight/{domain}/{name}"] = float(self.weight[d, s] / sequences[d])
        return scalars

    def table(self, global_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """Per domain and source over every trainer rank (``global_sum`` all-reduces): selection rate,
        mean weight and sequences; ``{}`` without sources."""
        if not self.names:
            return {}
        ran, weight, sequences = (global_sum(tensor) for tensor in (self.ran, self.weight, self.sequences))
        table = {}
        for index, domain in enumerate(self.domains):
            count = max(float(sequences[index]), 1.0)
            table[domain] = {name: {"selection_rate": float(ran[index, s]) / count, "weight": float(weight[index, s]) / count,
                                    "sequences": int(ran[index, s])}
                             for s, name in enumerate(self.names)}
        return table

    def state_dict(self) -> list[torch.Tensor]:
        return [self.ran, self.weight, self.sequences]

    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        self.ran, self.weight, self.sequences = state
