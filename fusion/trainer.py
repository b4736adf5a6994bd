"""The training loop. One step, top to bottom:

    dispatch ahead: for the micro-batches of steps up to t + prefetch_steps not yet sent,
       select sources -> request only the chosen ones (disaggregated sources start computing)
    micro-batches of step t (x gradient_accumulation_steps)
    -> for each: collect the answers that arrived -> fuse them
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
from collections import deque
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
from fusion.sources.dispatch import EngineSources, LocalDispatch
from fusion.sources.pool import DTYPES, ColocatedSources, OfflineSources
from fusion.topology import Topology


# Stands in for the score of a row a source did not answer (masked out of the weights anyway).
UNANSWERED_NLL = 1e9


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
class Dispatched:
    """A micro-batch whose sources were chosen and asked (``ran``/``ticket`` None without sources)."""

    batch: dict
    ran: torch.Tensor | None
    ticket: object


@dataclass(frozen=True)
class TrainResult:
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


class Trainer:
    """Continued training of the target under ZeRO-3 on the trainer ranks of ``topology``."""

    def __init__(self, config: Config, topology: Topology):
        self.config = config
        self.topology = topology
        self.output_dir = Path(config.run.output_dir)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.metrics = MetricsLogger(self.output_dir / "tensorboard", enabled=topology.is_logging_rank)
        self.sources = None

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

        self.selector = None
        fusion, data = config.fusion, config.data
        # Overlap needs sources in other processes; in-process sources answer when collected.
        self.prefetch_steps = 0
        if fusion.mode != "none" and config.topology.placement == "disaggregated":
            self.sources = EngineSources(config.sources, topology, fusion.top_k, config.topology.request_timeout_s,
                                         config.topology.startup_timeout_s)
            self.prefetch_steps = config.topology.prefetch_steps
        elif fusion.mode != "none" and fusion.offline:
            self.sources = LocalDispatch(OfflineSources(config.sources, Path(fusion.answers_dir), self.tokenizer, fusion.top_k,
                                                        fusion.temperature, self.train_chunks), self.tokenizer, data.max_length)
        elif fusion.mode != "none":
            self.sources = LocalDispatch(ColocatedSources(config.sources, self.tokenizer, fusion.top_k, fusion.temperature,
                                                          data.max_length, Path(config.run.cache_dir) / "vocab_maps", self.device),
                                         self.tokenizer, data.max_length)
        if config.fusion.mode in GATE_MODES:
            selector = config.selector
            self.selector = SelectionNetwork(len(config.sources), config.fusion.mode, vocab_size=len(self.tokenizer),
                                             embed_dim=selector.embedding_dim, hidden_dim=selector.hidden_dim,
                                             gate_temperature=selector.score_temperature).to(self.device)
            self.selector_optimizer = torch.optim.AdamW(self.selector.parameters(), lr=selector.lr)
            # Exploration draws differ per rank (different sequences) but are reproducible.
            self.generator = torch.Generator().manual_seed(config.run.seed + topology.dp_rank)
        self.selector_stats: dict[str, float] = {}
        # Source choices made before a checkpoint for micro-batches not yet trained (prefetched);
        # a resumed run reuses them so that it chooses exactly as the uninterrupted run did.
        self.replayed_choices: deque[torch.Tensor] = deque()
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
        if isinstance(self.sources, EngineSources):
            # The source groups loaded their models meanwhile.
            self.sources.wait_until_ready()
        if self.sources is not None:
            for name, counters in zip(self.sources.names, self.sources.counters):
                self.metrics.info(f"source {name}: vocabulary map coverage {counters.coverage}")

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
                subset_seed = self.config.run.seed if data.subset_seed is None else data.subset_seed
                chunks = chunks.shuffle(seed=subset_seed).select(range(limit))
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

    def _dispatch(self, batch: dict, step: int) -> Dispatched:
        """Choose the sources of each sequence and ask only those (predictive mode: before any source runs)."""
        if self.sources is None:
            return Dispatched(batch, None, None)
        selector = self.config.selector
        available = self.sources.available
        if self.replayed_choices:
            ran = self.replayed_choices.popleft() & available
        elif self.config.fusion.mode == "predictive":
            with torch.no_grad():
                gate_probs = self.selector(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)).softmax(-1)
            explore = exploration_rate_at(step, selector.exploration.start, selector.exploration.end,
                                          max(1, selector.exploration.decay_steps))
            ran = select(gate_probs.cpu(), selector.tau, selector.min_sources, self._max_sources, explore, self.generator, available)
        else:
            ran = available.expand(batch["input_ids"].shape[0], -1).clone()
        return Dispatched(batch, ran, self.sources.request(batch, ran, step))

    @property
    def _max_sources(self) -> int:
        return self.config.selector.max_sources or len(self.sources)

    def _fused_target(self, dispatched: Dispatched) -> FusedSoftTarget:
        """Collect the answers of a dispatched micro-batch and fuse them into one sparse target."""
        fusion, selector, batch = self.config.fusion, self.config.selector, dispatched.batch
        if self.sources is None:
            return _no_soft_target(batch)
        answers, arrived = self.sources.collect(dispatched.ticket)
        # A source that failed or went down answered nothing: fuse and learn from what arrived.
        ran = dispatched.ran & arrived
        if not bool(ran.any()):
            self._count_routing(batch["domains"], ran, torch.zeros(ran.shape))
            return _no_soft_target(batch)
        nll_per_byte = torch.stack([answer.nll_per_byte for answer in answers], dim=1)
        if fusion.mode == "predictive":
            gate_logits = self.selector(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
        elif fusion.mode == "scores":
            # A source that did not answer a row gets that row's worst arrived score as its feature;
            # it gets no weight there anyway (``used & ran`` below).
            worst = torch.where(ran, nll_per_byte, float("-inf")).amax(1, keepdim=True).nan_to_num(neginf=0.0)
            gate_logits = self.selector(nll_per_byte=torch.where(ran, nll_per_byte, worst).to(self.device))
        if fusion.mode in GATE_MODES:
            gate_probs = gate_logits.detach().softmax(-1).cpu()
            used = ran if fusion.mode == "predictive" else select(gate_probs, selector.tau, selector.min_sources, self._max_sources,
                                                                   0.0, available_mask=ran.any(0))
            weights = chosen_weights(gate_probs, used & ran)
            if fusion.sharpen_temperature is not None:
                weights = sharpen_weights(weights, nll_per_byte, fusion.sharpen_temperature)
            self._train_selector(gate_logits, ran, nll_per_byte)
        else:
            # Baselines weigh sources per batch; rows a source did not answer get no weight from it.
            nll_per_token = torch.stack([answer.nll_per_token for answer in answers], dim=1).nan_to_num(nan=UNANSWERED_NLL)
            weights = chosen_weights(baseline_weights(fusion.mode, nll_per_token, ran.any(0)), ran)
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
        self.selector_stats = {"select/loss": float(loss.detach()), "select/ce": float(stats.ce), "select/cv2": float(stats.cv2)}

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
        available = self.sources.available
        for s, name in enumerate(self.sources.names):
            scalars[f"select/rate/{name}"] = float(self.routing_ran[:, s].sum() / sequences.sum())
            counters = self.sources.counters[s]
            scalars[f"source/{name}/requests"] = counters.requests
            scalars[f"source/{name}/sequences"] = counters.sequences
            scalars[f"source/{name}/latency_s"] = counters.seconds / max(counters.requests, 1)
            scalars[f"source/{name}/waited_s"] = counters.waited
            scalars[f"source/{name}/failures"] = counters.failures
            scalars[f"source/{name}/down"] = float(not bool(available[s]))
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

    def _save_checkpoint(self, step: int, in_flight: deque[Dispatched]) -> None:
        """ZeRO-3 shards of every rank plus the state only the loop knows (step, selector, routing, RNG,
        and the source choices of micro-batches already dispatched for later steps)."""
        state = {"step": step, "routing": [self.routing_ran, self.routing_weight, self.routing_sequences],
                 "in_flight_choices": [entry.ran for entry in in_flight if entry.ran is not None]}
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
        self.replayed_choices = deque(state.get("in_flight_choices", []))
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
        in_flight: deque[Dispatched] = deque()
        next_dispatch_step = done + 1
        started = time.time()
        tokens_seen = 0
        losses: list[float] = []
        step_times: list[float] = []
        # What the run changed is only visible against where it started (a few batches' loss is noisy).
        eval_before = self.evaluate() if done == 0 else {}
        if eval_before:
            self.metrics.scalars(0, self._eval_scalars(eval_before))
        progress = tqdm(range(done + 1, trainer.max_steps + 1), desc="train", disable=not self.topology.is_logging_rank)
        for step in progress:
            step_started = time.time()
            if self.sources is not None:
                self.sources.agree_on_down(self.topology.trainer_group)
            # Requests for later steps go out now: disaggregated sources compute while this step trains.
            while next_dispatch_step <= min(step + self.prefetch_steps, trainer.max_steps):
                in_flight.extend(self._dispatch(next(micro_batches), next_dispatch_step)
                                 for _ in range(trainer.gradient_accumulation_steps))
                next_dispatch_step += 1
            dispatched = [in_flight.popleft() for _ in range(trainer.gradient_accumulation_steps)]
            batches = [entry.batch for entry in dispatched]
            targets = [self._fused_target(entry) for entry in dispatched]
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
            step_times.append(round(step_seconds, 4))
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
                self._save_checkpoint(step, in_flight)
            if trainer.eval_every and step % trainer.eval_every == 0 and step != trainer.max_steps:
                self.metrics.scalars(step, self._eval_scalars(self.evaluate()))

        final_eval = self.evaluate()
        self.metrics.scalars(trainer.max_steps, self._eval_scalars(final_eval))
        model_dir = self.save_model()
        routing = self.routing_table() if self.sources is not None else {}
        sources = self._source_summary() if self.sources is not None else {}
        window = min(5, len(losses))
        result = TrainResult(trainer.max_steps, tokens_seen, round(time.time() - started, 1), sum(losses[:window]) / window,
                             sum(losses[-window:]) / window, final_eval, eval_before, routing, sources, str(model_dir),
                             str(self.metrics.log_dir), step_times)
        if self.topology.is_logging_rank:
            (self.output_dir / "result.json").write_text(json.dumps(result.__dict__, indent=2))
        return result

    def _source_summary(self) -> dict:
        """Per source, over all trainer ranks: what was asked and how long the trainer waited; for
        disaggregated sources also what each replica reports it served, and why a replica went down."""
        available = self.sources.available
        served = self.sources.close()
        summary = {}
        for index, (name, counters) in enumerate(zip(self.sources.names, self.sources.counters)):
            local = torch.tensor([counters.requests, counters.sequences, counters.tokens, counters.seconds, counters.waited,
                                  counters.failures], device=self.device)
            requests, sequences, tokens, seconds, waited, failures = self._global_sum(local).tolist()
            summary[name] = {"requests": int(requests), "sequences": int(sequences), "tokens": int(tokens),
                             "compute_s": round(seconds, 2), "waited_s": round(waited, 2), "failures": int(failures),
                             "down": not bool(available[index]), "vocab_coverage": counters.coverage}
            if name in served:
                summary[name]["served"] = served[name]
            if isinstance(self.sources, EngineSources):
                summary[name]["down_reasons"] = self.sources.down_reasons[index]
        return summary

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
        """Release the sources (disaggregated: every source group is told to stop) and the logs."""
        if self.sources is not None:
            self.sources.close(collect_reports=False)
        self.metrics.close()
