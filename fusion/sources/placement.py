"""Which kind of ``Sources`` a run gets: none, offline answers, models in-process, or engine groups."""
from __future__ import annotations

from pathlib import Path

import torch

from fusion.config import Config
from fusion.sources.base import NoSources, Sources
from fusion.sources.dispatch import EngineSources
from fusion.sources.pool import ColocatedSources, OfflineSources
from fusion.topology import Topology


def open_sources(config: Config, topology: Topology, target_tokenizer, train_chunks, device: torch.device,
                 asks_sources: bool) -> Sources:
    """The run's sources as the trainer ranks see them.

    Args:
        train_chunks: the split the training rows' documents come from (``RunChunks.documents``: the
            whole chunked training split, or its pieces when packing cuts chunks); offline answers are
            keyed by its rows.
        asks_sources: False when the fusion policy never asks a source (the pool is then empty).
    """
    fusion, topology_config = config.fusion, config.topology
    if not asks_sources:
        return NoSources()
    if topology_config.placement == "disaggregated":
        return EngineSources(config.sources, topology, fusion.top_k, topology_config.request_timeout_s,
                             topology_config.startup_timeout_s)
    if fusion.offline:
        return OfflineSources(config.sources, Path(fusion.answers_dir), target_tokenizer, fusion.top_k, fusion.temperature,
                              train_chunks)
    return ColocatedSources(config.sources, target_tokenizer, fusion.top_k, fusion.temperature, config.data.max_length,
                            Path(config.run.cache_dir) / "vocab_maps", device)
