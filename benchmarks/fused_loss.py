"""Benchmark: sparse fused loss through the chunked LM head vs the dense reference approach.

Both methods compute the combined loss ``lam * CE(gold) + (1 - lam) * softCE(fused target)`` and
its gradients w.r.t. the final hidden states ``[B, L, H]`` and the LM-head weight ``[V, H]``
from the same S sparse source answers (top-k indices and log-probs, validity masks) and
per-sequence source weights.

- dense (baseline, FuseLLM's approach, vectorised): full logits ``[B, L, V]``; every source's
  weighted distribution is materialised as a ``[B, L, V]`` tensor by scatter and summed into
  one dense target; LM CE and soft CE by ``torch.nn.functional.cross_entropy``; plain autograd.
- sparse (ours): ``fusion.fusion_weights.fuse_soft_labels`` + ``fusion.loss.fused_lm_loss``.

Each method runs in its own fresh subprocess (so one's allocations cannot hide the other's).
Peak memory is the rise of the process's resident set high-water mark (``VmHWM`` in
``/proc/self/status``) over the resident set once the inputs exist, after resetting the mark
through ``/proc/self/clear_refs``: it sees every allocation of the process (torch's CPU
allocator, oneDNN/BLAS workspaces), which ``tracemalloc`` does not, and it needs no extra
package. Gradient buffers count for both methods. Time is the median of ``--repeats`` runs
(the memory run included, which keeps the whole benchmark short; both methods pay the same
first-run costs, and a warm-up on a tiny problem takes library initialisation out of it).
Values and gradients are compared by relative error ``||a - b|| / ||b||`` (must be <= 1e-4).

Prints a summary, then ``bar: memory_ratio <x>`` and ``bar: speed_ratio <x>`` (baseline / ours;
targets >= 10 and >= 1.0) as the last two lines; exits 0 whether or not the bars are met.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from fusion.fusion_weights import fuse_soft_labels  # noqa: E402
from fusion.loss import fused_lm_loss  # noqa: E402

MEMORY_BAR, SPEED_BAR, TOLERANCE = 10.0, 1.0, 1e-4


@dataclass
class Answer:
    indices: torch.Tensor  # [B, L, k] int32
    logprobs: torch.Tensor  # [B, L, k] float32, -inf where dropped
    valid: torch.Tensor  # [B, L] bool


def make_inputs(args: argparse.Namespace) -> dict:
    """Synthetic batch: padding at the end of the last sequence, 5% dropped candidates,
    10% positions invalid per source, one source not chosen for the first sequence."""
    gen = torch.Generator().manual_seed(args.seed)
    b, length, h, v = args.batch, args.length, args.hidden, args.vocab
    hidden = torch.randn(b, length, h, generator=gen).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * (2.0 / h**0.5)).requires_grad_()
    labels = torch.randint(0, v, (b, length), generator=gen)
    real = torch.ones(b, length, dtype=torch.bool)
    real[-1, length - length // 8 :] = False
    labels = labels.masked_fill(~real, -100)
    answers = []
    for _ in range(args.sources):
        indices = torch.randint(0, v, (b, length, args.k), generator=gen)
        # Top-k of a full-vocabulary distribution: sorted, holding most but not all of the mass.
        logprobs = torch.log_softmax(2 * torch.randn(b, length, args.k, generator=gen), -1).sort(-1, True).values - 0.3
        dropped = torch.rand(b, length, args.k, generator=gen) < 0.05
        valid = real & (torch.rand(b, length, generator=gen) >= 0.1)
        valid[:, -1] = False
        answers.append(Answer(indices.masked_fill(dropped, 0).int(), logprobs.masked_fill(dropped, -torch.inf), valid))
    weights = torch.rand(b, args.sources, generator=gen)
    weights[0, -1] = 0.0
    weights = weights / weights.sum(dim=1, keepdim=True)
    return dict(hidden=hidden, weight=weight, labels=labels, answers=answers, weights=weights)


def dense_step(inputs: dict, lam: float, temperature: float, chunk_size: int) -> torch.Tensor:
    hidden, weight, labels = inputs["hidden"], inputs["weight"], inputs["labels"]
    answers, weights = inputs["answers"], inputs["weights"]
    vocab = weight.shape[0]
    logits = hidden @ weight.t()  # [B, L, V]

    targets = labels[:, 1:]
    lm_count = (targets != -100).sum()
    lm_sum = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), targets.reshape(-1), reduction="sum")

    usable = torch.stack([a.valid & torch.isfinite(a.logprobs).any(-1) for a in answers], dim=-1)  # [B, L, S]
    position_weights = weights.unsqueeze(1) * usable
    total = position_weights.sum(-1, keepdim=True)
    soft_valid = total.squeeze(-1) > 0
    position_weights = torch.where(total > 0, position_weights / total.clamp_min(1e-30), 0.0)
    target = torch.zeros_like(logits)
    for s, a in enumerate(answers):
        probs = torch.softmax(a.logprobs / temperature, dim=-1).nan_to_num(0.0) * position_weights[..., s : s + 1]
        target += torch.zeros_like(logits).scatter_add_(2, a.indices.long(), probs)
    soft_terms = F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1, vocab), reduction="none")
    soft_sum = (soft_terms * soft_valid.reshape(-1)).sum()
    loss = lam * lm_sum / lm_count + (1 - lam) * soft_sum / soft_valid.sum()
    loss.backward()
    return loss.detach()


def sparse_step(inputs: dict, lam: float, temperature: float, chunk_size: int) -> torch.Tensor:
    fused = fuse_soft_labels(inputs["answers"], inputs["weights"], temperature)
    loss, _ = fused_lm_loss(
        inputs["hidden"], inputs["weight"], inputs["labels"], fused.indices, fused.probs, fused.valid,
        lam=lam, chunk_size=chunk_size,
    )
    loss.backward()
    return loss.detach()


STEPS = {"dense": dense_step, "sparse": sparse_step}


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def run_worker(args: argparse.Namespace) -> None:
    """One method in this (fresh) process: ``--repeats`` timed runs, the first also measuring
    peak memory; loss and gradients of the first run go to ``--tensors-out``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    step = STEPS[args.worker]
    # Warm-up on a tiny problem so one-time library initialisation is not counted as peak.
    tiny = argparse.Namespace(**{**vars(args), "batch": 1, "length": 8, "vocab": 64})
    step(make_inputs(tiny), args.lam, args.temperature, args.chunk_size)

    inputs = make_inputs(args)
    gc.collect()
    rss_before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    loss = step(inputs, args.lam, args.temperature, args.chunk_size)
    times = [time.perf_counter() - start]
    peak_bytes = (_status_kib("VmHWM") - rss_before) * 1024

    grads = (inputs["hidden"].grad.clone(), inputs["weight"].grad.clone())
    for _ in range(args.repeats - 1):
        inputs["hidden"].grad, inputs["weight"].grad = None, None
        start = time.perf_counter()
        step(inputs, args.lam, args.temperature, args.chunk_size)
        times.append(time.perf_counter() - start)
    torch.save({"loss": loss, "grad_hidden": grads[0], "grad_weight": grads[1]}, args.tensors_out)
    print(json.dumps({"peak_bytes": peak_bytes, "times_s": times}))


def spawn(args: argparse.Namespace, worker: str, chunk_size: int, tensors_out: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--tensors-out", tensors_out,
           "--chunk-size", str(chunk_size), "--repeats", str(args.repeats)]
    for name in ("batch", "length", "hidden", "vocab", "sources", "k", "lam", "temperature", "seed", "threads"):
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name}", str(value)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{worker} worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    report = {
        "config": {k: getattr(args, k) for k in ("batch", "length", "hidden", "vocab", "sources", "k", "lam",
                                                  "temperature", "chunk_size", "repeats", "threads", "seed")},
        "torch": torch.__version__,
        "torch_threads": args.threads or torch.get_num_threads(),
        # Timings on a shared machine mean little without the load they were taken under.
        "load_average_at_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for worker in ("dense", "sparse"):
            results[worker] = spawn(args, worker, args.chunk_size, f"{tmp}/{worker}.pt")
            results[worker]["median_s"] = statistics.median(results[worker]["times_s"])
        dense, sparse = (torch.load(f"{tmp}/{w}.pt") for w in ("dense", "sparse"))
        if args.sweep_chunk_sizes:
            report["chunk_sweep_median_s"] = {
                str(c): statistics.median(spawn(args, "sparse", c, f"{tmp}/sweep.pt")["times_s"])
                for c in args.sweep_chunk_sizes
            }

    errors = {
        "loss": abs(sparse["loss"].item() - dense["loss"].item()) / abs(dense["loss"].item()),
        "grad_hidden": rel_err(sparse["grad_hidden"], dense["grad_hidden"]),
        "grad_weight": rel_err(sparse["grad_weight"], dense["grad_weight"]),
    }
    memory_ratio = results["dense"]["peak_bytes"] / max(results["sparse"]["peak_bytes"], 1)
    speed_ratio = results["dense"]["median_s"] / results["sparse"]["median_s"]
    report.update(
        dense=results["dense"], sparse=results["sparse"],
        loss={"dense": dense["loss"].item(), "sparse": sparse["loss"].item()},
        relative_errors=errors, equal_within_tolerance=all(e <= TOLERANCE for e in errors.values()),
        memory_ratio=memory_ratio, speed_ratio=speed_ratio,
        bars={"memory_ratio": MEMORY_BAR, "speed_ratio": SPEED_BAR,
              "met": memory_ratio >= MEMORY_BAR and speed_ratio >= SPEED_BAR},
        total_wall_s=time.perf_counter() - started,
        load_average_at_end=os.getloadavg(),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    mib = 2**20
    for worker in ("dense", "sparse"):
        r = results[worker]
        print(f"{worker:>6}: peak {r['peak_bytes'] / mib:8.1f} MiB   median {r['median_s']:.3f} s   "
              f"runs {[round(t, 3) for t in r['times_s']]}")
    print("relative errors: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
          + f" (tolerance {TOLERANCE:g}: {'ok' if report['equal_within_tolerance'] else 'FAILED'})")
    if "chunk_sweep_median_s" in report:
        sweep = report["chunk_sweep_median_s"]
        print("chunk sweep (median s): " + ", ".join(f"{c}: {t:.3f}" for c, t in sweep.items()))
    print(f"wrote {out} in {report['total_wall_s']:.0f} s")
    print(f"bar: memory_ratio {memory_ratio:.2f}")
    print(f"bar: speed_ratio {speed_ratio:.2f}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks/results/fused_loss.json"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--sources", type=int, default=4)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--lam", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=1.0)
    # Speed is flat from 256 to 2048 on CPU (GEMM-bound); 512 keeps the [chunk, V] buffer at 96 MiB.
    p.add_argument("--chunk-size", type=int, default=512, help="positions per LM-head chunk (ours)")
    p.add_argument("--sweep-chunk-sizes", type=int, nargs="*", default=[],
                   help="also time ours at these chunk sizes (each in a fresh process)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (>= 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=sorted(STEPS), help=argparse.SUPPRESS)
    p.add_argument("--tensors-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.repeats < 1 or args.chunk_size < 1:
        p.error("--repeats and --chunk-size must be >= 1")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        run_worker(arguments)
    else:
        main(arguments)
