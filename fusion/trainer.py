"""The training loop. One optimizer step, top to bottom (``Trainer._train_step``):

    choose  -> the policy picks each sequence's sources, before any runs (up to ``prefetch`` steps ahead)
    request -> only the chosen sources are asked (engine groups start computing at once)
    collect -> per micro-batch of step t, the answers that arrived
    weigh   -> the policy turns them into per-sequence weights (and learns from what it saw)
    fuse -> loss -> step -> log: one sparse soft target per micro-batch, the fused loss through the
               chunked LM head, ZeRO-3 backward and optimizer step, metrics

The same loop serves one rank and many, every fusion mode (``fusion.policies``) and every kind
of source (``fusion.sources.base.Sources``). Loss normalisation is explicit: every micro-batch's
loss is a sum over its tokens divided by the number of real tokens in the *whole* optimizer step
(all micro-batches, all data-parallel ranks), so the summed gradient is the gradient of the
global mean loss, whatever the sharding.
"""
from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from fusion.checkpoints import Checkpoints, run_manifest
from fusion.config import Config, config_text, save_config
from fusion.data import TextBatchCollator, iterate_epochs, make_dataloader
from fusion.finished import FINISHED, write_finished
from fusion.fusion_weights import FusedSoftTarget, empty_soft_target, fuse_soft_labels
from fusion.metrics import MetricsLogger, RunProgress, TrainResult, data_scalars, eval_scalars
from fusion.packing import utilisation
from fusion.policies import POLICIES, make_policy, tokenizer_families
from fusion.routing import Routing
from fusion.sources.base import close_and_summarise, counter_scalars, wait_scalars
from fusion.sources.placement import open_sources
from fusion.splits import run_chunks, run_tokenizers
from fusion.target import TargetModel
from fusion.topology import Topology


class Dispatched(NamedTuple):
    """A micro-batch whose sources were chosen (``chosen`` ``[B, S]``) and asked (``ticket``)."""

    batch: dict
    chosen: torch.Tensor
    ticket: object


class Interrupted(Exception):
    """Training stopped early on request, after saving a checkpoint at ``step`` in ``checkpoint_dir``."""

    def __init__(self, step: int, checkpoint_dir: Path):
        super().__init__(f"stopped on request after step {step}; checkpoint saved in {checkpoint_dir}")
        self.step, self.checkpoint_dir = step, checkpoint_dir


class Trainer:
    """Continued training of the target under ZeRO-3 on the trainer ranks of ``topology``."""

    def __init__(self, config: Config, topology: Topology):
        self.config = config
        self.topology = topology
        self.output_dir = Path(config.run.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.metrics = MetricsLogger(self.output_dir / "tensorboard", enabled=topology.is_logging_rank)
        self.sources = None
        self.stop_requested = False  # set from a signal handler: checkpoint and stop at the next step boundary

    def setup(self) -> None:
        config, topology, data = self.config, self.topology, self.config.data
        torch.manual_seed(config.run.seed)
        # Chunks must fit max_length under every tokenizer that will read them.
        tokenizers = run_tokenizers(config)
        self.tokenizer = tokenizers[0]
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        chunks = run_chunks(config, tokenizers)
        self.train_data, self.eval_data, self.packing = chunks.train_rows, chunks.eval, chunks.packing
        for name, rows in ((data.train_split, chunks.train), (data.eval_split, chunks.eval)):
            self.metrics.info(f"data {name}: {len(rows)} chunks of <= {data.max_length} tokens ({chunks.reports[name]})")
        self.metrics.info(f"data {data.train_split} rows ({'packed' if data.packing else 'one chunk each'}): {chunks.packing}")
        manifest = run_manifest(config, tokenizers, chunks.train)
        self.checkpoints = Checkpoints(self.checkpoint_dir, manifest, config.trainer.keep_last,
                                       topology.is_logging_rank, topology.trainer_group, topology.dp_size, self.metrics.info)
        self.collator = TextBatchCollator(self.tokenizer, data.max_length)
        self.train_loader = make_dataloader(self.train_data, self.collator, config.trainer.micro_batch_size,
                                            topology.dp_rank, topology.dp_size, config.run.seed, shuffle=True)

        self.sources = open_sources(config, topology, self.tokenizer, chunks.documents, self.device,
                                    POLICIES[config.fusion.mode].asks_sources)
        # Overlap needs sources in other processes; in-process sources answer when collected.
        self.prefetch_steps = config.topology.prefetch_steps if self.sources.overlaps else 0
        # Exploration draws differ per rank (different sequences) but are reproducible.
        self.policy = make_policy(config, len(self.sources.names), vocab_size=len(self.tokenizer), device=self.device,
                                  seed=config.run.seed + topology.dp_rank, average_gradients=topology.trainer_mean_,
                                  sum_over_ranks=topology.trainer_sum,
                                  families=tokenizer_families([source["tokenizer_sha256"] for source in manifest["sources"]]))
        # Without sources the loss is the LM term alone, at full weight.
        self.lam = config.fusion.lam if self.sources.names else 1.0
        self.routing = Routing(sorted(set(self.train_data["domain"])), self.sources.names)
        # Source choices made before a checkpoint for micro-batches not yet trained (prefetched);
        # a resumed run reuses them so that it chooses exactly as the uninterrupted run did.
        self.replayed_choices: deque[torch.Tensor] = deque()
        self.progress = RunProgress()
        self.target = TargetModel(config, topology.dp_size, self.device)
        self.sources.ready()  # engine groups loaded their models meanwhile
        for name, counters in zip(self.sources.names, self.sources.counters):
            self.metrics.info(f"source {name}: vocabulary map coverage {counters.coverage}")

    def _dispatch(self, batch: dict, step: int) -> Dispatched:
        """Choose the sources of each sequence (before any runs) and ask only those."""
        available = self.sources.available
        chosen = self.replayed_choices.popleft() & available if self.replayed_choices else self.policy.choose(batch, available, step)
        return Dispatched(batch, chosen, self.sources.request(batch, chosen, step))

    def _fused_target(self, entry: Dispatched) -> FusedSoftTarget:
        """Collect the answers of a dispatched micro-batch, weigh them and fuse one sparse target."""
        batch = entry.batch
        answers, arrived = self.sources.collect(entry.ticket)
        ran = entry.chosen & arrived  # a source that failed or went down answered nothing
        weights = self.policy.weigh(batch, answers, ran)
        self.policy.learn(batch, answers, ran)
        self.routing.count(batch["domains"], ran, weights)
        if not bool(ran.any()):
            return empty_soft_target(*batch["input_ids"].shape)
        return fuse_soft_labels(answers, weights, self.config.fusion.temperature)

    def _train_step(self, step: int, micro_batches, in_flight: deque[Dispatched]) -> tuple[float, float, float, int, float]:
        """One optimizer step: ``(loss, lm loss, soft loss, target tokens, utilisation)`` over every trainer rank."""
        accumulation, max_steps = self.config.trainer.gradient_accumulation_steps, self.config.trainer.max_steps
        self.sources.agree_on_down(self.topology.trainer_group)
        # Requests for later steps go out now: disaggregated sources compute while this step trains.
        while self.next_dispatch_step <= min(step + self.prefetch_steps, max_steps):
            in_flight.extend(self._dispatch(next(micro_batches), self.next_dispatch_step) for _ in range(accumulation))
            self.next_dispatch_step += 1
        dispatched = [in_flight.popleft() for _ in range(accumulation)]
        batches = [entry.batch for entry in dispatched]
        targets = [self._fused_target(entry) for entry in dispatched]
        # Shifted targets: position t predicts token t+1, so the first label of a row is never a target.
        # Real tokens and the slots holding them (what the target computes on): the step's utilisation.
        local_counts = torch.tensor([sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches),
                                     sum(int(target.valid.sum()) for target in targets),
                                     sum(int(batch["attention_mask"].sum()) for batch in batches),
                                     sum(batch["input_ids"].numel() for batch in batches)])
        lm_normalizer, soft_normalizer, real_tokens, slots = self.topology.trainer_sum(local_counts).clamp(min=1).float().to(self.device)
        sums = torch.zeros(2, dtype=torch.float64)
        for batch, target in zip(batches, targets):
            loss, stats = self.target.forward(batch, target, self.lam, lm_normalizer, soft_normalizer)
            self.target.backward_and_step(loss)
            sums += torch.stack([stats.lm_loss_sum.detach(), stats.soft_loss_sum.detach()]).double().cpu()
        lm_loss, soft_loss = (self.topology.trainer_sum(sums) / torch.stack([lm_normalizer, soft_normalizer]).double().cpu()).tolist()
        return self.lam * lm_loss + (1 - self.lam) * soft_loss, lm_loss, soft_loss, int(lm_normalizer), utilisation(int(real_tokens), int(slots))

    def train(self) -> TrainResult:
        trainer = self.config.trainer
        done = self._resume()
        if self.topology.is_logging_rank:  # only once the run is accepted (a refused resume changes nothing)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.output_dir / "config.yaml")
            self.metrics.text("config", config_text(self.config))
            (self.output_dir / FINISHED).unlink(missing_ok=True)  # under way (trainer.resume false starts over)
        # Skip the micro-batches the resumed steps consumed, so the data order is the uninterrupted one.
        consumed = done * trainer.gradient_accumulation_steps
        micro_batches = (batch for _, batch in iterate_epochs(self.train_loader, consumed // len(self.train_loader),
                                                               consumed % len(self.train_loader)))
        in_flight: deque[Dispatched] = deque()
        self.next_dispatch_step, self.started = done + 1, time.time()
        self.metrics.scalars(done, data_scalars(self.packing))
        if done == 0:  # what the run changed is only visible against where it started (a few batches' loss is noisy)
            self.progress.eval_before = self.evaluate()
            self.metrics.scalars(0, eval_scalars(self.progress.eval_before))
        progress = tqdm(range(done + 1, trainer.max_steps + 1), desc="train", disable=not self.topology.is_logging_rank)
        for step in progress:
            step_started, waited = time.time(), [counters.waited for counters in self.sources.counters]
            step_loss, lm_loss, soft_loss, step_tokens, step_utilisation = self._train_step(step, micro_batches, in_flight)
            step_seconds = time.time() - step_started
            self.progress.add_step(step_loss, step_tokens, step_seconds)
            perf = {"perf/step_s": step_seconds, "perf/tokens_per_s": step_tokens / step_seconds, **self.target.timings(),
                    "perf/utilisation": step_utilisation,
                    **wait_scalars(self.sources, waited, step_seconds)}
            progress.set_postfix(loss=f"{step_loss:.3f}")
            if step % trainer.log_every == 0 or step == trainer.max_steps:
                self.metrics.scalars(step, {
                    "loss/total": step_loss, "loss/lm": lm_loss, "loss/soft": soft_loss, "optim/lr": self.target.lr,
                    **perf, **self.policy.stats(), **self.routing.scalars(), **counter_scalars(self.sources)})
                self.metrics.info(f"step {step}/{trainer.max_steps} loss {step_loss:.4f} (lm {lm_loss:.4f} soft {soft_loss:.4f}) "
                                  f"lr {self.target.lr:.2e} {step_tokens / step_seconds:.0f} tok/s")
            if step != trainer.max_steps and self.topology.trainer_sum(torch.tensor([float(self.stop_requested)])) > 0:
                self._save_checkpoint(step, in_flight)  # every trainer rank was asked, or one was: all stop here
                raise Interrupted(step, self.checkpoint_dir)
            if trainer.checkpoint_every and (step % trainer.checkpoint_every == 0 or step == trainer.max_steps):
                self._save_checkpoint(step, in_flight)
            if trainer.eval_every and step % trainer.eval_every == 0 and step != trainer.max_steps:
                self.metrics.scalars(step, eval_scalars(self.evaluate()))

        final_eval = self.evaluate()
        self.metrics.scalars(trainer.max_steps, eval_scalars(final_eval))
        model_dir = self.save_model()
        run, seconds = self.progress, self.progress.seconds + time.time() - self.started
        sources = close_and_summarise(self.sources, self.topology.trainer_sum, seconds, self.topology.dp_size)
        result = TrainResult(trainer.max_steps, run.tokens, round(seconds, 1), run.loss_window(True), run.loss_window(False),
                             final_eval, run.eval_before, self.routing.table(self.topology.trainer_sum), sources, str(model_dir),
                             str(self.metrics.log_dir), run.step_seconds)
        if self.topology.is_logging_rank:
            (self.output_dir / "result.json").write_text(json.dumps(asdict(result), indent=2))
            write_finished(self.output_dir, self.config, trainer.max_steps)
        return result

    def _save_checkpoint(self, step: int, in_flight: deque[Dispatched]) -> None:
        """ZeRO-3 shards plus what only the loop knows: step, policy (selector, its optimizer and RNG),
        routing, and the source choices of micro-batches already dispatched for later steps."""
        progress = asdict(self.progress) | {"seconds": self.progress.seconds + time.time() - self.started,
                                            "sources": [asdict(counters) for counters in self.sources.counters]}
        state = {"step": step, "routing": self.routing.state_dict(), "policy": self.policy.state_dict(),
                 "in_flight_choices": [entry.chosen for entry in in_flight], "progress": progress}
        self.checkpoints.save(self.target, step, state)

    def _resume(self) -> int:
        """Load the newest complete checkpoint when resuming is on and one exists; return the steps already done."""
        step = self.checkpoints.resume_step(self.config.trainer.resume, self.config.trainer.max_steps)
        if step is None:
            return 0
        state = self.checkpoints.load(self.target, step)
        self.routing.load_state_dict(state["routing"])
        self.policy.load_state_dict(state["policy"])
        self.replayed_choices = deque(state["in_flight_choices"])
        self.progress = RunProgress(**state["progress"])
        for counters, saved in zip(self.sources.counters, self.progress.sources):
            counters.__dict__.update(saved)  # a resumed run's summary covers the whole run
        self.metrics.info(f"resumed from {self.checkpoint_dir} at step {step}")
        return step

    def evaluate(self) -> dict:
        """Per-domain held-out loss, perplexity and bits per byte of the target on the eval split."""
        trainer, topology = self.config.trainer, self.topology
        return self.target.held_out(self.eval_data, self.collator, trainer.micro_batch_size, trainer.eval_batches,
                                    topology.dp_rank, topology.dp_size, topology.trainer_sum)

    def save_model(self) -> Path:
        """The target as a Hugging Face folder (and the policy's selector beside it); rank 0 writes."""
        model_dir = self.output_dir / "model"
        self.target.save_pretrained(model_dir, self.tokenizer, write=self.topology.is_logging_rank)
        if self.topology.is_logging_rank:
            self.policy.save(self.output_dir / "selector.pt", self.sources.names)
        if self.topology.dp_size > 1:
            dist.barrier(group=self.topology.trainer_group)
        return model_dir

    def cleanup(self) -> None:
        """Release the sources (disaggregated: every source group is told to stop) and the logs."""
        if self.sources is not None:
            self.sources.close(collect_reports=False)
        self.metrics.close()
