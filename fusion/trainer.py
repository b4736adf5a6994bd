"""The training loop. One step, top to bottom:

    micro-batches (x gradient_accumulation_steps)
    -> for each: select sources -> request only the chosen ones -> fuse their sparse answers
       (and train the selector on the scores the sources realised)
    -> global token counts -> for each: target forward through the chunked LM head -> fused loss
       -> ZeRO-3 backward -> step
    -> log

The same loop serves one rank and many. Loss normalisation is explicit: every micro-batch's
loss is a sum over its tokens divided by the number of real tokens in the *whole* optimizer
step (all micro-batches, all data-parallel ranks), so the summed gradient is the gradient of
the global mean loss, whatever the sharding. DeepSpeed averages gradients over ranks and
divides the loss by the accumulation steps; ``_backward`` undoes both.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import HfDeepSpeedConfig

from fusion.config import Config, ConfigError, save_config
from fusion.data import TextBatchCollator, iterate_epochs, load_chunked_split, make_dataloader
from fusion.fusion_weights import FusedSoftTarget, chosen_weights, fuse_soft_labels, sharpen_weights
from fusion.loss import fused_lm_loss
from fusion.metrics import MetricsLogger
from fusion.selection import GATE_MODES, SelectionNetwork, baseline_weights, exploration_rate_at, select, selector_loss
from fusion.sources.pool import DTYPES, ColocatedSources, OfflineSources
from fusion.sources.scoring import encode_with_offsets
from fusion.topology import Topology


def _no_soft_target(batch: dict) -> FusedSoftTarget:
    """An empty soft target (no source ran): the loss is the LM term alone."""
    batch_size, length = batch["input_ids"].shape
    return FusedSoftTarget(torch.zeros((batch_size, length, 0), dtype=torch.long), torch.zeros((batch_size, length, 0)),
                           torch.zeros((batch_size, length), dtype=torch.bool))


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

    def forward(self, input_ids, attention_mask, labels, soft_indices, soft_probs, soft_valid, lam,
                lm_normalizer, soft_normalizer):
        hidden = self.causal_lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
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
    owned = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
             "scheduler", "gradient_clipping", "bf16", "fp16"}
    clashes = sorted(owned & set(engine))
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
        # torch's AdamW: no JIT-compiled extension needed, on CPU or GPU.
        "optimizer": {"type": "AdamW", "params": {"lr": trainer.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": trainer.weight_decay, "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": trainer.max_steps, "warmup_num_steps": max(1, trainer.warmup_steps),
            "warmup_min_ratio": 0.0, "cos_min_ratio": trainer.min_lr_ratio, "warmup_type": "linear"}},
    })
    return engine


@dataclass(frozen=True)
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    first_loss: float  # mean of the first (up to) 5 steps
    final_loss: float  # mean of the last (up to) 5 steps
    eval: dict
    routing: dict
    sources: dict
    model_dir: str
    tensorboard_dir: str


class Trainer:
    """Continued training of the target under ZeRO-3 on the trainer ranks of ``topology``."""

    def __init__(self, config: Config, topology: Topology):
        self.config = config
        self.topology = topology
        self.output_dir = Path(config.run.output_dir)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.metrics = MetricsLogger(self.output_dir / "tensorboard", enabled=topology.is_logging_rank)

    # -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        config, topology = self.config, self.topology
        torch.manual_seed(config.run.seed)
        if topology.is_logging_rank:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "config.yaml")

        self.tokenizer = AutoTokenizer.from_pretrained(config.target)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Chunks must fit max_length under every tokenizer that will read them.
        tokenizers = [self.tokenizer] + [AutoTokenizer.from_pretrained(source.path) for source in config.sources]
        self.train_data, self.eval_data = self._load_data(tokenizers)
        self.collator = TextBatchCollator(self.tokenizer, config.data.max_length)
        self.train_loader = make_dataloader(self.train_data, self.collator, config.trainer.micro_batch_size,
                                            topology.dp_rank, topology.dp_size, config.run.seed, shuffle=True)

        self.sources = None
        self.selector = None
        if config.fusion.mode != "none" and config.fusion.offline:
            self.sources = OfflineSources(config.sources, Path(config.fusion.answers_dir), self.tokenizer, config.fusion.top_k,
                                          config.fusion.temperature, self.train_chunks)
        elif config.fusion.mode != "none":
            self.sources = ColocatedSources(config.sources, self.tokenizer, config.fusion.top_k, config.fusion.temperature,
                                            config.data.max_length, Path(config.run.cache_dir) / "vocab_maps", self.device)
            for name, counters in zip(self.sources.names, self.sources.counters):
                self.metrics.info(f"source {name}: vocabulary map coverage {counters.coverage}")
        if config.fusion.mode in GATE_MODES:
            selector = config.selector
            self.selector = SelectionNetwork(len(config.sources), config.fusion.mode, vocab_size=len(self.tokenizer),
                                             embed_dim=selector.embedding_dim, hidden_dim=selector.hidden_dim,
                                             gate_temperature=selector.score_temperature).to(self.device)
            self.selector_optimizer = torch.optim.AdamW(self.selector.parameters(), lr=selector.lr)
            # Exploration draws differ per rank (different sequences) but are reproducible.
            self.generator = torch.Generator().manual_seed(config.run.seed + topology.dp_rank)
        self.selector_stats: dict[str, float] = {}
        # Without sources the loss is the LM term alone, at full weight.
        self.lam = 1.0 if config.fusion.mode == "none" else config.fusion.lam
        self.domains = sorted(set(self.train_data["domain"]))
        # Routing counters, [domain, source]: sequences a source ran for, and its fusion weight.
        source_count = len(config.sources)
        self.routing_ran = torch.zeros(len(self.domains), source_count, dtype=torch.float64)
        self.routing_weight = torch.zeros(len(self.domains), source_count, dtype=torch.float64)
        self.routing_sequences = torch.zeros(len(self.domains), dtype=torch.float64)

        ds_config = deepspeed_config(config, topology.dp_size)
        # Kept alive so that from_pretrained builds the model already partitioned (zero.Init).
        self._hf_ds_config = HfDeepSpeedConfig(ds_config)
        causal_lm = AutoModelForCausalLM.from_pretrained(config.target, dtype=DTYPES[config.trainer.precision])
        module = TrainModule(causal_lm, config.trainer.loss_chunk_size)
        deepspeed.zero.register_external_parameter(module, module.lm_head_weight)
        self.engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=ds_config)

    def _load_data(self, tokenizers):
        data = self.config.data
        splits = []
        for key, split_name, limit in (("train_split", data.train_split, data.max_train_chunks),
                                       ("eval_split", data.eval_split, data.max_eval_chunks)):
            try:
                chunks, report = load_chunked_split(data.corpus, split_name, data.domains, tokenizers, data.max_length,
                                                    cache_dir=Path(self.config.run.cache_dir) / "chunks")
            except KeyError as error:
                raise ConfigError(f"data.{key} / data.domains: {error.args[0]}") from None
            if key == "train_split":
                # Offline answers are stored by row of the whole chunked split: keep the row numbers.
                self.train_chunks = chunks
                chunks = chunks.add_column("chunk_index", list(range(len(chunks))))
            if limit is not None and len(chunks) > limit:
                chunks = chunks.shuffle(seed=self.config.run.seed).select(range(limit))
            self.metrics.info(f"data {split_name}: {len(chunks)} chunks of <= {data.max_length} tokens ({report})")
            splits.append(chunks)
        return splits

    # -----------------------------------------------------------------------------------------
    def _global_sum(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().to(torch.float64).clone()
        if self.topology.dp_size > 1:
            dist.all_reduce(value, group=self.topology.trainer_group)
        return value

    def _backward(self, loss: torch.Tensor) -> None:
        # The loss is already normalised by the global token count: undo DeepSpeed's averaging
        # over data-parallel ranks and don't divide by the accumulation steps.
        self.engine.backward(loss * self.topology.dp_size, scale_wrt_gas=False)

    def _forward(self, batch: dict, target: FusedSoftTarget, lm_normalizer, soft_normalizer):
        return self.engine(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
                           batch["labels"].to(self.device), target.indices.to(self.device), target.probs.to(self.device),
                           target.valid.to(self.device), self.lam, lm_normalizer, soft_normalizer)

    def _fused_target(self, batch: dict, step: int) -> FusedSoftTarget:
        """Select sources, request only the chosen ones, fuse their answers into one sparse target."""
        fusion, selector = self.config.fusion, self.config.selector
        batch_size, length = batch["input_ids"].shape
        if fusion.mode == "none":
            return _no_soft_target(batch)
        _, target_offsets, _ = encode_with_offsets(self.tokenizer, batch["texts"], self.config.data.max_length)
        available = self.sources.available
        max_sources = selector.max_sources or len(self.sources)
        if fusion.mode == "predictive":
            # Features known before any source runs: only the chosen sources compute.
            gate_logits = self.selector(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
            explore = exploration_rate_at(step, selector.exploration.start, selector.exploration.end,
                                          max(1, selector.exploration.decay_steps))
            ran = select(gate_logits.softmax(-1).cpu(), selector.tau, selector.min_sources, max_sources, explore,
                         self.generator, available)
        else:
            ran = available.expand(batch_size, -1).clone()
        answers = self.sources.answer(batch, target_offsets, ran, length)
        nll_per_byte = torch.stack([answer.nll_per_byte for answer in answers], dim=1)
        if fusion.mode == "scores":
            gate_logits = self.selector(nll_per_byte=nll_per_byte.to(self.device))
        if fusion.mode in GATE_MODES:
            gate_probs = gate_logits.detach().softmax(-1).cpu()
            used = ran if fusion.mode == "predictive" else select(gate_probs, selector.tau, selector.min_sources, max_sources, 0.0,
                                                                   available_mask=available)
            weights = chosen_weights(gate_probs, used)
            if fusion.sharpen_temperature is not None:
                weights = sharpen_weights(weights, nll_per_byte, fusion.sharpen_temperature)
            self._train_selector(gate_logits, ran, nll_per_byte)
        else:
            nll_per_token = torch.stack([answer.nll_per_token for answer in answers], dim=1)
            weights = baseline_weights(fusion.mode, nll_per_token, available)
        self._count_routing(batch["domains"], ran, weights)
        return fuse_soft_labels(answers, weights, fusion.temperature)

    def _train_selector(self, gate_logits: torch.Tensor, ran: torch.Tensor, nll_per_byte: torch.Tensor) -> None:
        selector = self.config.selector
        loss, stats = selector_loss(gate_logits, ran.to(self.device), nll_per_byte.to(self.device), selector.beta,
                                    selector.score_temperature)
        self.selector_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Replicated on every trainer rank: average its gradients so the replicas stay identical.
        for parameter in self.selector.parameters():
            if parameter.grad is not None and self.topology.dp_size > 1:
                dist.all_reduce(parameter.grad, group=self.topology.trainer_group)
                parameter.grad /= self.topology.dp_size
        self.selector_optimizer.step()
        self.selector_stats = {"select/loss": float(loss), "select/ce": float(stats.ce), "select/cv2": float(stats.cv2)}

    def _count_routing(self, domains: list[str], ran: torch.Tensor, weights: torch.Tensor) -> None:
        for row, domain in enumerate(domains):
            index = self.domains.index(domain)
            self.routing_sequences[index] += 1
            self.routing_ran[index] += ran[row].double()
            self.routing_weight[index] += weights[row].double()

    def _routing_scalars(self) -> dict:
        """This rank's cumulative selection rates and weights (the final table is all-reduced)."""
        if self.sources is None:
            return {}
        scalars = {}
        sequences = self.routing_sequences.clamp(min=1)
        for s, name in enumerate(self.sources.names):
            scalars[f"select/rate/{name}"] = float(self.routing_ran[:, s].sum() / sequences.sum())
            counters = self.sources.counters[s]
            scalars[f"source/{name}/requests"] = counters.requests
            scalars[f"source/{name}/sequences"] = counters.sequences
            scalars[f"source/{name}/latency_s"] = counters.seconds / max(counters.requests, 1)
            for d, domain in enumerate(self.domains):
                scalars[f"select/rate/{domain}/{name}"] = float(self.routing_ran[d, s] / sequences[d])
                scalars[f"select/weight/{domain}/{name}"] = float(self.routing_weight[d, s] / sequences[d])
        return scalars

    def routing_table(self) -> dict:
        """Per domain and source, over the whole run and all trainer ranks: selection rate and mean weight."""
        totals = [self._global_sum(t.to(self.device)).cpu() for t in (self.routing_ran, self.routing_weight, self.routing_sequences)]
        ran, weight, sequences = totals
        table = {}
        for index, domain in enumerate(self.domains):
            count = max(float(sequences[index]), 1.0)
            table[domain] = {name: {"selection_rate": float(ran[index, s]) / count, "weight": float(weight[index, s]) / count,
                                    "sequences": int(ran[index, s])}
                             for s, name in enumerate(self.sources.names)}
        return table

    def _checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def _save_checkpoint(self, step: int) -> None:
        """ZeRO-3 shards of every rank plus the state only the loop knows (step, selector, routing, RNG)."""
        state = {"step": step, "routing": [self.routing_ran, self.routing_weight, self.routing_sequences]}
        if self.selector is not None:
            state.update(selector=self.selector.state_dict(), selector_optimizer=self.selector_optimizer.state_dict(),
                         generator=self.generator.get_state())
        self.engine.save_checkpoint(str(self._checkpoint_dir()), tag=f"step{step}", client_state={"fusion": state})

    def _resume(self) -> int:
        """Load the latest checkpoint when resuming is on and one exists; return the steps already done."""
        if not (self.config.trainer.resume and (self._checkpoint_dir() / "latest").is_file()):
            return 0
        _, client_state = self.engine.load_checkpoint(str(self._checkpoint_dir()))
        state = client_state["fusion"]
        self.routing_ran, self.routing_weight, self.routing_sequences = state["routing"]
        if self.selector is not None:
            self.selector.load_state_dict(state["selector"])
            self.selector_optimizer.load_state_dict(state["selector_optimizer"])
            self.generator.set_state(state["generator"])
        if state["step"] >= self.config.trainer.max_steps:
            raise ConfigError(f"trainer.max_steps: the checkpoint in {self._checkpoint_dir()} is already at step {state['step']}; "
                              "raise max_steps, or set trainer.resume=false (or another run.output_dir) to start over")
        self.metrics.info(f"resumed from {self._checkpoint_dir()} at step {state['step']}")
        return state["step"]

    def train(self) -> TrainResult:
        trainer = self.config.trainer
        done = self._resume()
        # Skip the micro-batches the resumed steps consumed, so the data order is the uninterrupted one.
        consumed = done * trainer.gradient_accumulation_steps
        micro_batches = (batch for _, batch in iterate_epochs(self.train_loader, consumed // len(self.train_loader),
                                                               consumed % len(self.train_loader)))
        started = time.time()
        tokens_seen = 0
        losses: list[float] = []
        progress = tqdm(range(done + 1, trainer.max_steps + 1), desc="train", disable=not self.topology.is_logging_rank)
        for step in progress:
            step_started = time.time()
            batches = [next(micro_batches) for _ in range(trainer.gradient_accumulation_steps)]
            targets = [self._fused_target(batch, step) for batch in batches]
            # Shifted targets: position t predicts token t+1, so the first label of a row is never a target.
            local_counts = torch.tensor([sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches),
                                         sum(int(target.valid.sum()) for target in targets)], device=self.device)
            lm_normalizer, soft_normalizer = self._global_sum(local_counts).clamp(min=1).float()

            sums = torch.zeros(2, dtype=torch.float64, device=self.device)
            for batch, target in zip(batches, targets):
                loss, stats = self._forward(batch, target, lm_normalizer, soft_normalizer)
                self._backward(loss)
                self.engine.step()
                sums += torch.stack([stats.lm_loss_sum.detach(), stats.soft_loss_sum.detach()]).double()
            lm_loss, soft_loss = (self._global_sum(sums) / torch.stack([lm_normalizer, soft_normalizer]).double()).tolist()
            lam = self.config.fusion.lam
            step_loss = lam * lm_loss + (1 - lam) * soft_loss if self.sources is not None else lm_loss
            step_tokens = int(lm_normalizer)
            tokens_seen += step_tokens
            losses.append(step_loss)
            step_seconds = time.time() - step_started
            progress.set_postfix(loss=f"{step_loss:.3f}")
            if step % trainer.log_every == 0 or step == trainer.max_steps:
                self.metrics.scalars(step, {
                    "loss/total": step_loss, "loss/lm": lm_loss, "loss/soft": soft_loss,
                    "optim/lr": self.engine.get_lr()[0],
                    "perf/step_s": step_seconds, "perf/tokens_per_s": step_tokens / step_seconds,
                    **self.selector_stats, **self._routing_scalars()})
                self.metrics.info(f"step {step}/{trainer.max_steps} loss {step_loss:.4f} (lm {lm_loss:.4f} soft {soft_loss:.4f}) "
                                  f"lr {self.engine.get_lr()[0]:.2e} {step_tokens / step_seconds:.0f} tok/s")
            if trainer.checkpoint_every and step % trainer.checkpoint_every == 0 and step != trainer.max_steps:
                self._save_checkpoint(step)
            if trainer.eval_every and step % trainer.eval_every == 0 and step != trainer.max_steps:
                self.metrics.scalars(step, self._eval_scalars(self.evaluate()))

        final_eval = self.evaluate()
        self.metrics.scalars(trainer.max_steps, self._eval_scalars(final_eval))
        model_dir = self.save_model()
        routing = self.routing_table() if self.sources is not None else {}
        sources = {}
        if self.sources is not None:
            for name, counters in zip(self.sources.names, self.sources.counters):
                local = torch.tensor([counters.requests, counters.sequences, counters.seconds, counters.failures], device=self.device)
                requests, sequences, seconds, failures = self._global_sum(local).tolist()
                sources[name] = {"requests": int(requests), "sequences": int(sequences), "seconds": round(seconds, 2),
                                 "failures": int(failures), "vocab_coverage": counters.coverage}
        window = min(5, len(losses))
        result = TrainResult(trainer.max_steps, tokens_seen, round(time.time() - started, 1), sum(losses[:window]) / window,
                             sum(losses[-window:]) / window, final_eval, routing, sources, str(model_dir),
                             str(self.metrics.log_dir))
        if self.topology.is_logging_rank:
            (self.output_dir / "result.json").write_text(json.dumps(result.__dict__, indent=2))
        return result

    # -----------------------------------------------------------------------------------------
    @staticmethod
    def _eval_scalars(evaluation: dict) -> dict:
        return {f"eval/{domain}/{key}": value for domain, row in evaluation.items()
                for key, value in row.items() if key in ("loss", "perplexity", "bits_per_byte")}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Per-domain held-out loss, perplexity and bits per byte of the target on the eval split.

        Every trainer rank runs the same number of forward passes (ZeRO-3 gathers are collective);
        each takes its share of every domain's first ``eval_batches x dp_size`` batches.
        """
        trainer, topology = self.config.trainer, self.topology
        self.engine.eval()
        domains = sorted(set(self.eval_data["domain"]))
        results = {}
        per_step = trainer.micro_batch_size * topology.dp_size
        for domain in domains:
            rows = self.eval_data.filter(lambda row: row["domain"] == domain)
            steps = min(trainer.eval_batches, len(rows) // per_step)
            totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # nats, tokens, bytes
            for index in range(steps):
                start = index * per_step + topology.dp_rank * trainer.micro_batch_size
                batch = self.collator([rows[i] for i in range(start, start + trainer.micro_batch_size)])
                _, stats = self._forward(batch, _no_soft_target(batch), torch.ones((), device=self.device),
                                         torch.ones((), device=self.device))
                totals += torch.tensor([float(stats.lm_loss_sum), float(stats.lm_count),
                                        sum(len(text.encode("utf-8")) for text in batch["texts"])],
                                       dtype=torch.float64, device=self.device)
            nats, tokens, num_bytes = self._global_sum(totals).tolist()
            if tokens:
                results[domain] = {"loss": nats / tokens, "perplexity": math.exp(nats / tokens),
                                   "bits_per_byte": nats / num_bytes / math.log(2), "tokens": int(tokens)}
        self.engine.train()
        return results

    def save_model(self) -> Path:
        """Gather the ZeRO-3 shards and save the target as a Hugging Face folder (rank 0 writes)."""
        model_dir = self.output_dir / "model"
        # What engine.save_16bit_model uses: gathers one module at a time onto rank 0 only.
        state = self.engine._zero3_consolidated_16bit_state_dict()
        if self.topology.is_logging_rank:
            prefix = "causal_lm."
            state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
            causal_lm = self.engine.module.causal_lm
            causal_lm.save_pretrained(model_dir, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(model_dir)
            if self.selector is not None:
                torch.save({"selector": self.selector.state_dict(), "optimizer": self.selector_optimizer.state_dict(),
                            "sources": self.sources.names}, self.output_dir / "selector.pt")
        if self.topology.dp_size > 1:
            dist.barrier(group=self.topology.trainer_group)
        return model_dir

    def cleanup(self) -> None:
        self.metrics.close()
