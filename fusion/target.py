"""The target model under ZeRO-3: built partitioned, trained through the chunked fused loss, saved.

``TargetModel`` owns the DeepSpeed engine of the trainer ranks; the training loop only calls
``forward`` / ``backward_and_step`` and the checkpoint and export methods.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import deepspeed
import torch
from torch import nn
from transformers.integrations import HfDeepSpeedConfig

from fusion.config import Config, TrainerConfig
from fusion.evaluation import sharded_held_out
from fusion.fusion_weights import FusedSoftTarget, empty_soft_target
from fusion.loss import auto_chunk_size, fused_lm_loss
from fusion.sources.loading import DTYPES, load_causal_lm

# Keys of the engine JSON that the run config decides.
RUN_OWNED_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
                  "scheduler", "gradient_clipping", "bf16", "fp16"}


class TrainModule(nn.Module):
    """The target causal LM plus the chunked LM-head loss, as one module.

    The loss reads the LM-head weight directly instead of calling the head, so under ZeRO-3 the
    weight is registered as an external parameter of this module: DeepSpeed gathers it for
    this forward and reduces its gradient like any other.
    """

    def __init__(self, causal_lm: nn.Module, chunk_size: int):
        super().__init__()
        self.causal_lm = causal_lm
        self.chunk_size = chunk_size
        self.lm_head_weight = causal_lm.get_output_embeddings().weight

    def forward(self, input_ids, position_ids, labels, soft_indices, soft_probs, soft_valid, lam,
                lm_normalizer, soft_normalizer):
        # Position ids that restart at every document (and at the padding) and no 2D mask: the model
        # builds a block-diagonal causal mask from them (transformers' packed-sequence masks), so
        # attention stays within documents; padding comes last and forms a block of its own. Only
        # without a cache: with one (use_cache defaults to true) transformers ignores the restarts.
        hidden = self.causal_lm.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        return fused_lm_loss(hidden, self.lm_head_weight, labels, soft_indices, soft_probs, soft_valid, lam,
                             self.chunk_size, lm_normalizer, soft_normalizer)


def deepspeed_config(config: Config, dp_size: int) -> dict:
    """The engine settings from ``trainer.deepspeed_config`` plus what the run config decides.

    Raises:
        ValueError: the JSON sets a key the run config owns, or uses ``"auto"`` (which raw
            ``deepspeed.initialize`` silently ignores inside sub-configs).
    """
    trainer = config.trainer
    path = Path(trainer.deepspeed_config)
    engine = json.loads(path.read_text())
    offload = engine.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    clashes = sorted(RUN_OWNED_KEYS & set(engine))
    if clashes:
        raise ValueError(f"{path}: keys {clashes} are set from the run config (trainer.*); remove them from the JSON")
    if '"auto"' in path.read_text():
        raise ValueError(f"{path}: \"auto\" values are only filled by the HF Trainer; write numbers")
    micro, accumulation = trainer.micro_batch_size, trainer.gradient_accumulation_steps
    engine.update({
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * dp_size,
        "gradient_clipping": trainer.grad_clip,
        "bf16": {"enabled": trainer.precision == "bf16"},
        "fp16": {"enabled": trainer.precision == "fp16"},
        # torch's AdamW (no JIT-compiled extension needed, on CPU or GPU), except with the optimizer
        # offloaded: DeepSpeed refuses any but its CPU Adam there (built on first use, several minutes).
        "optimizer": {"type": "AdamW", "params": {"lr": trainer.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": trainer.weight_decay,
                                                  "torch_adam": offload not in ("cpu", "nvme")}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": trainer.max_steps, "warmup_num_steps": trainer.warmup_steps,
            "warmup_min_ratio": 0.0, "cos_min_ratio": trainer.min_lr_ratio, "warmup_type": "linear"}},
    })
    return engine


def loss_chunk_size(trainer: TrainerConfig, causal_lm: nn.Module) -> int:
    """``trainer.loss_chunk_size``, or for ``auto`` what fits ``trainer.loss_memory_mb`` for this model's
    LM head (:func:`fusion.loss.auto_chunk_size`); reads the full shape of a ZeRO-3 partitioned weight."""
    if trainer.loss_chunk_size != "auto":
        return trainer.loss_chunk_size
    weight = causal_lm.get_output_embeddings().weight
    vocab_size, hidden_size = getattr(weight, "ds_shape", weight.shape)
    return auto_chunk_size(vocab_size, hidden_size, DTYPES[trainer.precision], trainer.loss_memory_mb * 2**20)


def train_module(causal_lm: nn.Module, trainer: TrainerConfig) -> TrainModule:
    """The module the engine trains: ``causal_lm`` in training mode, its decoder layers recomputed in
    backward with ``trainer.activation_checkpointing``, and the fused loss's chunk size."""
    causal_lm.train()
    if trainer.activation_checkpointing:
        # Non-reentrant checkpointing: the one that works with ZeRO-3's parameter hooks.
        causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return TrainModule(causal_lm, loss_chunk_size(trainer, causal_lm))


class TargetModel:
    """The target's DeepSpeed ZeRO-3 engine on the trainer ranks.

    Args:
        config: the run config (``target``, ``trainer.*``).
        dp_size: trainer (data-parallel) ranks.
        device: this rank's device.
    """

    def __init__(self, config: Config, dp_size: int, device: torch.device):
        self.dp_size = dp_size
        self.device = device
        ds_config = deepspeed_config(config, dp_size)
        trainer = config.trainer
        # Kept alive so that from_pretrained builds the model already partitioned (zero.Init).
        self._hf_ds_config = HfDeepSpeedConfig(ds_config)
        module = train_module(load_causal_lm(config.target, trainer.precision, trainer.attention), trainer)
        self.chunk_size = module.chunk_size
        deepspeed.zero.register_external_parameter(module, module.lm_head_weight)
        self.engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=ds_config)
        self.seconds: Counter = Counter()  # training forward / backward / optimizer time since the last ``timings``

    def forward(self, batch: dict, target: FusedSoftTarget, lam: float, lm_normalizer, soft_normalizer):
        """``(loss, FusedLossStats)`` of one micro-batch (see :func:`fusion.loss.fused_lm_loss`)."""
        device = self.device
        started = time.perf_counter()
        try:
            return self.engine(batch["input_ids"].to(device), batch["position_ids"].to(device), batch["labels"].to(device),
                               target.indices.to(device), target.probs.to(device), target.valid.to(device), lam,
                               lm_normalizer, soft_normalizer)
        finally:
            self.seconds["forward"] += time.perf_counter() - started

    def backward_and_step(self, loss: torch.Tensor) -> None:
        started = time.perf_counter()
        # The loss is already normalised by the global token count: undo DeepSpeed's averaging
        # over data-parallel ranks and don't divide by the accumulation steps.
        self.engine.backward(loss * self.dp_size, scale_wrt_gas=False)
        backward_done = time.perf_counter()
        self.engine.step()
        self.seconds["backward"] += backward_done - started
        self.seconds["optimizer"] += time.perf_counter() - backward_done

    def timings(self) -> dict[str, float]:
        """``perf/{forward,backward,optimizer}_s`` since the last call (this rank)."""
        seconds, self.seconds = self.seconds, Counter()
        return {f"perf/{name}_s": value for name, value in seconds.items()}

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def held_out(self, eval_data, collator, micro_batch_size: int, max_batches: int, dp_rank: int, dp_size: int,
                 global_sum) -> dict[str, dict]:
        """Per-domain held-out ``{loss, perplexity, bits_per_byte, tokens}`` on ``eval_data`` (a collective;
        see :func:`fusion.evaluation.sharded_held_out`)."""
        ones = torch.ones((), device=self.device)

        def score(batch: dict) -> tuple[float, int]:
            _, stats = self.forward(batch, empty_soft_target(*batch["input_ids"].shape), 1.0, ones, ones)
            return float(stats.lm_loss_sum), int(stats.lm_count)

        rows = {domain: eval_data.filter(lambda row: row["domain"] == domain) for domain in sorted(set(eval_data["domain"]))}
        training_seconds = self.seconds.copy()  # evaluation is not training time
        self.engine.eval()
        scores = sharded_held_out(score, rows, collator, micro_batch_size, max_batches, dp_rank, dp_size, global_sum)
        self.engine.train()
        self.seconds = training_seconds
        return {domain: {"loss": s.nll / s.tokens, "perplexity": s.perplexity, "bits_per_byte": s.bits_per_byte,
                         "tokens": s.tokens} for domain, s in scores.items()}

    def save_checkpoint(self, directory: Path, tag: str, state: dict) -> None:
        """ZeRO-3 shards of every rank, optimizer and schedule, plus the loop's ``state`` (``latest`` is
        left to the caller: see :mod:`fusion.checkpoints`)."""
        self.engine.save_checkpoint(str(directory), tag=tag, client_state={"fusion": state}, save_latest=False)

    def load_checkpoint(self, directory: Path, tag: str) -> dict:
        """Load checkpoint ``tag`` of ``directory``; returns the loop's state saved with it."""
        _, client_state = self.engine.load_checkpoint(str(directory), tag=tag)
        return client_state["fusion"]

    def save_pretrained(self, model_dir: Path, tokenizer, write: bool) -> None:
        """Gather the shards (a collective: every trainer rank calls it) and, where ``write``, save the
        target as a Hugging Face folder with ``tokenizer``."""
        # What engine.save_16bit_model uses: gathers one module at a time onto rank 0 only.
        state = self.engine._zero3_consolidated_16bit_state_dict()
        if write:
            prefix = "causal_lm."
            state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
            self.engine.module.causal_lm.save_pretrained(model_dir, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(model_dir)
