"""Benchmark: the real training step at real scale, on one device (GPU, or CPU at toy size).

One rank runs ``fusion.trainer.Trainer._train_step`` (the training loop's step, unchanged) on a
Llama-shaped target under DeepSpeed ZeRO-3 (``fusion.target.TargetModel``), with every source
colocated on the same device (``fusion.sources.pool.ColocatedSources``, fusion mode
``all_uniform``: every source answers every sequence). The models are random-init at published
shapes; the tokenizers are the real ones of ``assets/tokenizers`` (target: smollm2's byte-level
BPE; sources: gpt2 byte-level BPE, mistral-v1 SentencePiece, gemma3 SentencePiece with 262,144
tokens), so alignment and vocabulary maps do the real work.

=========  ====================================  ======================================  ==========
 size       target                                sources                                 tokens/row
=========  ====================================  ======================================  ==========
 full       Llama-3.2-1B shape (16 x 2048, GQA 8) Qwen2.5-0.5B (gpt2), TinyLlama-1.1B       2,048
                                                  (mistral-v1), Gemma-3-1B (gemma3)
 --toy      2 x 64 Llama                          2 x 32 Qwen2 (gpt2), Llama (mistral-v1),    128
                                                  Gemma-3 (minilm-wordpiece)
=========  ====================================  ======================================  ==========

Rows are full-length chunks of concatenated corpus text (the documents of a domain joined by a
blank line), chunked by the project's chunker to fit every tokenizer. ``--packing`` sets
``data.packing`` (documents kept apart inside a row, ``fusion.packing``) and writes the corpus as
its separate documents instead.

Reported per measured step (after ``--warmup`` steps): target tokens/s (real target tokens of the
step / step time) and MFU, source target-tokens/s per source (tokens sent / its compute time),
the share of the step the trainer waited on each source, peak memory, and, on the last step's
batch, the fused loss step (target forward + fused LM/soft loss + backward + optimizer step)
against the plain LM loss step (the Hugging Face model's own forward with ``labels``: full
logits, cross-entropy, backward, the same optimizer step), each timed ``--repeats`` times.

Model FLOPs per step (PaLM's MFU, appendix B of Chowdhery et al. 2022)::

    flops = tokens * (6 * N + 12 * n_layers * n_heads * head_dim * seq_len)

``N``: the target's parameters without the input embedding (the LM head counts; tied weights
once); ``tokens``: real target tokens; ``seq_len``: the row length. The attention term counts
the full (non-causal) score matrix, as PaLM does. MFU = flops / time / peak, the peak being the
device's dense bf16 tensor throughput from ``PEAK_BF16_TFLOPS`` (by device name), the time the
step's time less its wait on the (colocated) sources: the target's own share of the device
(``mfu``, the bar); over the whole step it is ``mfu_whole_step``. On CPU there is no such
figure: MFU is null.

Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the process's resident
high-water mark (``VmHWM``), which includes every model and library of the process.

Writes ``benchmarks/results/gpu_step.json`` (``--out``) and ends with ``bar:`` lines: ``mfu``
(target >= 0.40 on GPU), ``fused_vs_lm`` (<= 1.1) and ``source_wait_share`` (reported).
Exits 0 whether or not the bars are met.

On the GPU machine: ``python benchmarks/gpu_step.py --device cuda`` (docs/CLUSTER.md, GPU settings).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

MFU_BAR, FUSED_VS_LM_BAR = 0.40, 1.1
# Dense bf16 tensor-core peak in TFLOP/s (vendor data sheets, SXM/board variants as named by
# torch.cuda.get_device_name); the first key contained in the device's name wins.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 NVL": 835.5, "H100 PCIe": 756.0, "H100": 989.4, "H800": 989.4, "B200": 2250.0,
                    "A100": 312.0, "A800": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0}

# (name, tokenizer folder, model class, shape) at full size and at toy size.
TARGET_TOKENIZER = "smollm2"
FULL = {
    "target": ("LlamaForCausalLM", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                        num_attention_heads=32, num_key_value_heads=8, head_dim=64)),
    "sources": [
        ("qwen-gpt2", "gpt2", "Qwen2ForCausalLM", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                                        num_attention_heads=14, num_key_value_heads=2)),
        ("llama-mistral", "mistral-v1", "LlamaForCausalLM", dict(hidden_size=2048, intermediate_size=5632,
                                                                 num_hidden_layers=22, num_attention_heads=32,
                                                                 num_key_value_heads=4)),
        ("gemma3", "gemma3", "Gemma3ForCausalLM", dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                                                       num_attention_heads=4, num_key_value_heads=1, head_dim=256)),
    ],
}
TOY = {
    "target": ("LlamaForCausalLM", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)),
    "sources": [
        ("qwen-gpt2", "gpt2", "Qwen2ForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=4, num_key_value_heads=2)),
        ("llama-mistral", "mistral-v1", "LlamaForCausalLM", dict(hidden_size=32, intermediate_size=64,
                                                                 num_hidden_layers=2, num_attention_heads=4,
                                                                 num_key_value_heads=2)),
        # The Gemma-3 architecture over WordPiece: building the 262k gemma3 vocabulary map takes minutes on CPU.
        ("gemma-wordpiece", "minilm-wordpiece", "Gemma3ForCausalLM", dict(hidden_size=32, intermediate_size=64,
                                                                           num_hidden_layers=2, num_attention_heads=4,
                                                                           num_key_value_heads=1, head_dim=8)),
    ],
}
CONFIG_CLASSES = {"LlamaForCausalLM": "LlamaConfig", "Qwen2ForCausalLM": "Qwen2Config",
                  "Gemma3ForCausalLM": "Gemma3TextConfig"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--toy", action="store_true", help="tiny models and 128-token rows (CPU smoke test)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="cuda: fail unless a GPU is visible; cpu: hide every GPU; auto: a GPU when there is one")
    p.add_argument("--length", type=int, default=None, help="tokens per row (default 2048, toy 128)")
    p.add_argument("--micro-batch", type=int, default=None, help="rows per micro-batch (default 4, toy 2)")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 5, toy 2)")
    p.add_argument("--warmup", type=int, default=1, help="steps before measuring")
    p.add_argument("--repeats", type=int, default=None, help="timed runs of each loss step (default 5, toy 2)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="target precision and source dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--attention", choices=("sdpa", "flash_attention_2", "eager"), default="sdpa")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--deepspeed-config", default=str(REPO_ROOT / "ds_configs/zero3.json"),
                   help="trainer.deepspeed_config (ds_configs/zero3_offload.json: parameters and optimizer on CPU)")
    p.add_argument("--packing", action="store_true", help="data.packing: true (rows of separate documents)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default torch's)")
    p.add_argument("--corpus", default=str(REPO_ROOT / "assets/corpus"),
                   help="a save_to_disk DatasetDict with train and validation splits of text and domain")
    p.add_argument("--work-dir", default=None, help="where models, corpus and run go (default: a temporary folder)")
    p.add_argument("--cache-dir", default=str(REPO_ROOT / ".cache/fusion"),
                   help="run.cache_dir: vocabulary maps and chunked corpora, reused by later runs (they depend on the "
                        "tokenizers and texts only)")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks/results/gpu_step.json"))
    args = p.parse_args()
    toy = args.toy
    args.length = args.length or (128 if toy else 2048)
    args.micro_batch = args.micro_batch or (2 if toy else 4)
    args.steps = args.steps or (2 if toy else 5)
    args.repeats = args.repeats or (2 if toy else 5)
    if min(args.length, args.micro_batch, args.steps, args.repeats) < 1 or args.warmup < 0:
        p.error("--length, --micro-batch, --steps and --repeats must be >= 1, --warmup >= 0")
    return args


def save_model(path: Path, class_name: str, shape: dict, tokenizer, dtype, device, max_length: int, seed: int) -> Path:
    """A random-init model of ``shape`` over ``tokenizer`` (its vocabulary), saved with it."""
    import torch
    import transformers

    config = getattr(transformers, CONFIG_CLASSES[class_name])(
        vocab_size=len(tokenizer), max_position_embeddings=max(max_length, 128), tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(transformers, class_name)(config).to(dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_corpus(path: Path, source: Path, rows_needed: int, length: int, packing: bool) -> Path:
    """A corpus folder (``save_to_disk``) from ``source``'s train split holding about twice the text that
    ``rows_needed`` rows of ``length`` tokens take: each domain's documents joined into one long text
    (with packing: kept apart); a few of its validation documents as the eval split."""
    import datasets

    corpus = datasets.load_from_disk(str(source))
    budget = rows_needed * length * 8  # characters per domain: ~4 characters per token, twice over
    by_domain: dict[str, list[str]] = {}
    for text, domain in zip(corpus["train"]["text"], corpus["train"]["domain"]):
        texts = by_domain.setdefault(domain, [])
        if sum(map(len, texts)) < budget:
            texts.append(text)
    rows = [(domain, text) for domain, texts in sorted(by_domain.items()) for text in (texts if packing else ["\n\n".join(texts)])]
    validation = corpus["validation"].select(range(min(8, len(corpus["validation"]))))
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": [text for _, text in rows], "domain": [domain for domain, _ in rows]}),
        "validation": datasets.Dataset.from_dict({"text": validation["text"], "domain": validation["domain"]}),
    }).save_to_disk(str(path))
    return path


def run_config(args, work: Path, target: Path, sources: list[tuple[str, Path]], precision: str, corpus: Path) -> dict:
    rows = (args.warmup + args.steps) * args.micro_batch
    data = {"corpus": str(corpus), "max_length": args.length, "max_train_chunks": rows, "max_eval_chunks": 8}
    if args.packing:
        data["packing"] = True
    return {
        "target": str(target),
        "run": {"output_dir": str(work / "run"), "seed": 0, "cache_dir": args.cache_dir},
        "sources": [{"name": name, "path": str(path), "dtype": precision, "attention": args.attention,
                     "batch_size": args.micro_batch} for name, path in sources],
        "data": data,
        "trainer": {"deepspeed_config": args.deepspeed_config, "micro_batch_size": args.micro_batch,
                    "max_steps": args.warmup + args.steps + 3 * args.repeats + 1, "lr": 1e-5, "warmup_steps": 1,
                    "precision": precision, "attention": args.attention,
                    "activation_checkpointing": args.activation_checkpointing, "loss_chunk_size": "auto",
                    "num_threads": args.threads},
        "fusion": {"mode": "all_uniform"},
    }


def flops_per_token(causal_lm, seq_len: int) -> tuple[float, int]:
    """``(6 N + 12 n_layers n_heads head_dim seq_len, N)`` (module docstring); ``N`` from the full
    (ZeRO-3 partitioned) parameter shapes."""
    def numel(parameter):
        return getattr(parameter, "ds_numel", parameter.numel())

    total = sum(numel(parameter) for parameter in causal_lm.parameters())  # tied weights appear once
    embedding = causal_lm.get_input_embeddings().weight
    if embedding is not causal_lm.get_output_embeddings().weight:
        total -= numel(embedding)
    config = causal_lm.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 6.0 * total + 12.0 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len, total


def peak_tflops(device) -> tuple[float | None, str]:
    import torch

    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None), name


def resident_peak_bytes() -> int:
    return int(re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def plain_lm_step(target, batch: dict) -> None:
    """The Hugging Face model's own LM loss on ``batch`` through the same engine: full logits, cross-entropy."""
    device = target.device
    inputs = {key: batch[key].to(device) for key in ("input_ids", "position_ids", "attention_mask") if key in batch}
    if "position_ids" in inputs:  # packed rows: attention follows the position restarts (fusion.target)
        inputs.pop("attention_mask")
    loss = target.engine.module.causal_lm(**inputs, labels=batch["labels"].to(device), use_cache=False).loss
    target.backward_and_step(loss)


def timed(function, repeats: int, synchronize) -> list[float]:
    times = []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        function()
        synchronize()
        times.append(time.perf_counter() - started)
    return times


def main(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoTokenizer

    from experiments.local_runs import free_port
    from fusion.config import parse_config
    from fusion.data import iterate_epochs
    from fusion.topology import LaunchEnv, init_deepspeed_comm, init_topology, plan_ranks, shutdown
    from fusion.trainer import Dispatched, Trainer

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU; use --device cpu (or auto)")
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    shapes = TOY if args.toy else FULL
    work_context = tempfile.TemporaryDirectory() if args.work_dir is None else None
    work = Path(work_context.name if work_context else args.work_dir)
    tokenizers = REPO_ROOT / "assets/tokenizers"

    built = time.perf_counter()
    target_tokenizer = AutoTokenizer.from_pretrained(tokenizers / TARGET_TOKENIZER)
    class_name, shape = shapes["target"]
    target_dir = save_model(work / "target", class_name, shape, target_tokenizer, dtype, device, args.length, seed=0)
    source_dirs = []
    for index, (name, tokenizer_name, class_name, shape) in enumerate(shapes["sources"]):
        tokenizer = AutoTokenizer.from_pretrained(tokenizers / tokenizer_name)
        source_dirs.append((name, save_model(work / name, class_name, shape, tokenizer, dtype, device, args.length,
                                             seed=index + 1)))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    corpus = write_corpus(work / "corpus", Path(args.corpus), (args.warmup + args.steps) * args.micro_batch, args.length,
                          args.packing)
    config = parse_config(run_config(args, work, target_dir, source_dirs, precision, corpus))
    build_s = time.perf_counter() - built

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    backend = "nccl" if device.type == "cuda" else "gloo"
    topology = init_topology(plan_ranks(config, 1), LaunchEnv.from_mapping(env), backend)
    trainer = Trainer(config, topology)
    try:
        init_deepspeed_comm(topology, backend)
        setup_started = time.perf_counter()
        trainer.setup()
        setup_s = time.perf_counter() - setup_started
        report = measure(args, trainer, device, Dispatched, iterate_epochs)
    finally:
        trainer.cleanup()
        shutdown()
        if work_context:
            work_context.cleanup()
    peak, device_name = peak_tflops(device)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # CPU time beside wall time: on a shared machine the wall time says more about the load than the code.
    report.update(build_s=round(build_s, 1), setup_s=round(setup_s, 1), total_s=round(time.perf_counter() - started, 1),
                  process_cpu_s=round(usage.ru_utime + usage.ru_stime, 1))
    flops, params = report.pop("_flops_per_token")
    target = report["target"]
    mfu = None if peak is None else flops * target["tokens_per_s_without_source_wait"] / (peak * 1e12)
    target.update(params_without_input_embedding=params, flops_per_token=flops, mfu=mfu,
                  mfu_whole_step=None if peak is None else flops * target["tokens_per_s"] / (peak * 1e12))
    return {
        "device": device_name, "device_peak_bf16_tflops": peak, "toy": args.toy, "precision": precision,
        "attention": args.attention, "activation_checkpointing": args.activation_checkpointing,
        "deepspeed_config": Path(args.deepspeed_config).name,
        "packing": args.packing, "rows": "packed documents" if args.packing else "full-length chunks of concatenated text",
        "micro_batch": args.micro_batch, "length": args.length, "loss_chunk_size": trainer.target.chunk_size,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "sources": {name: shape_of(shapes, name) for name, _ in source_dirs}, "target_shape": shapes["target"][1],
        **report,
        "bars": {"mfu": MFU_BAR, "fused_vs_lm": FUSED_VS_LM_BAR,
                 "met": {"mfu": None if mfu is None else mfu >= MFU_BAR,
                         "fused_vs_lm": report["fused_vs_lm"] <= FUSED_VS_LM_BAR}},
    }


def shape_of(shapes: dict, name: str) -> dict:
    _, tokenizer, class_name, shape = next(entry for entry in shapes["sources"] if entry[0] == name)
    return {"tokenizer": tokenizer, "class": class_name, **shape}


def measure(args, trainer, device, Dispatched, iterate_epochs) -> dict:
    """Warm-up and measured ``_train_step`` calls, then the fused vs plain LM loss step on the last batch."""
    import torch

    from fusion.fusion_weights import empty_soft_target
    from fusion.sources.loading import HeadChunkedForward

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    seen: list[dict] = []

    def micro_batches():
        for _, batch in iterate_epochs(trainer.train_loader):
            seen.append(batch)
            yield batch

    stream, in_flight = micro_batches(), deque()
    trainer.next_dispatch_step = 1
    counters = trainer.sources.counters
    names = trainer.sources.names
    steps = []
    for step in range(1, args.warmup + args.steps + 1):
        before = [(c.waited, c.seconds, c.tokens) for c in counters]
        if step == args.warmup + 1:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            else:
                Path("/proc/self/clear_refs").write_text("5")  # resident high-water mark := now
        synchronize()
        step_started = time.perf_counter()
        loss, lm_loss, soft_loss, _, _ = trainer._train_step(step, stream, in_flight)
        synchronize()
        seconds = time.perf_counter() - step_started
        batch = seen[-1]
        if step <= args.warmup:
            continue
        steps.append({
            "seconds": seconds, "loss": loss, "lm_loss": lm_loss, "soft_loss": soft_loss,
            "target_tokens": int(batch["attention_mask"].sum()),
            "slots": int(batch["attention_mask"].numel()),
            "sources": {name: {"waited_s": c.waited - w, "compute_s": c.seconds - s, "target_tokens": c.tokens - t}
                        for name, c, (w, s, t) in zip(names, counters, before)},
        })
    peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resident_peak_bytes()
    seconds = sum(s["seconds"] for s in steps)
    tokens = sum(s["target_tokens"] for s in steps)
    sources = {}
    for name in names:
        waited = sum(s["sources"][name]["waited_s"] for s in steps)
        compute = sum(s["sources"][name]["compute_s"] for s in steps)
        sent = sum(s["sources"][name]["target_tokens"] for s in steps)
        sources[name] = {"target_tokens_per_s": sent / compute if compute else None, "wait_share": waited / seconds,
                         "waited_s": waited}
    for name, scorer in zip(names, trainer.sources.scorers):
        # fusion.sources.loading.head_chunked: hidden states through the head in chunks, or the model's full logits.
        sources[name]["logits"] = "head in chunks" if isinstance(scorer.model, HeadChunkedForward) else "full"

    # The last step's batch: its fused target (the sources answer it once more), then both loss steps.
    batch = seen[-1]
    chosen = trainer.policy.choose(batch, trainer.sources.available, args.warmup + args.steps)
    target = trainer._fused_target(Dispatched(batch, chosen, trainer.sources.request(batch, chosen, 0)))
    lm_count = (batch["labels"][:, 1:] != -100).sum().clamp(min=1).float().to(device)
    soft_count = target.valid.sum().clamp(min=1).float().to(device)

    def fused_step():
        loss, _ = trainer.target.forward(batch, target, trainer.lam, lm_count, soft_count)
        trainer.target.backward_and_step(loss)

    fused_times = timed(fused_step, args.repeats, synchronize)
    plain_times = timed(lambda: plain_lm_step(trainer.target, batch), args.repeats, synchronize)
    lm_only_target = empty_soft_target(*batch["input_ids"].shape)

    def fused_lm_only_step():
        loss, _ = trainer.target.forward(batch, lm_only_target, 1.0, lm_count, soft_count)
        trainer.target.backward_and_step(loss)

    lm_only_times = timed(fused_lm_only_step, args.repeats, synchronize)
    fused, plain = statistics.median(fused_times), statistics.median(plain_times)
    return {
        "steps": steps,
        "target": {"tokens_per_s": tokens / seconds,
                   "tokens_per_s_without_source_wait": tokens / (seconds - sum(v["waited_s"] for v in sources.values())),
                   "step_s_median": statistics.median(s["seconds"] for s in steps),
                   "slot_utilisation": tokens / sum(s["slots"] for s in steps)},
        "sources_per_step": sources,
        "source_wait_share": sum(source["wait_share"] for source in sources.values()),
        "peak_memory_bytes": peak_memory,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process VmHWM",
        "loss_steps_s": {"fused": fused_times, "plain_lm": plain_times, "chunked_lm_only": lm_only_times},
        "fused_vs_lm": fused / plain,
        "chunked_lm_only_vs_lm": statistics.median(lm_only_times) / plain,
        "_flops_per_token": flops_per_token(trainer.target.engine.module.causal_lm, args.length),
    }


def print_report(report: dict, out: Path) -> None:
    target = report["target"]
    mib = 2**20
    print(f"device {report['device']}  precision {report['precision']}  rows {report['micro_batch']} x {report['length']} "
          f"({report['rows']})  loss chunk {report['loss_chunk_size']}")
    print(f"target: {target['tokens_per_s']:.0f} tok/s ({target['tokens_per_s_without_source_wait']:.0f} without the "
          f"source wait), step {target['step_s_median']:.3f} s (median), "
          f"{target['params_without_input_embedding'] / 1e6:.1f} M params, MFU "
          f"{'n/a (no bf16 peak for this device)' if target['mfu'] is None else format(target['mfu'], '.3f')}")
    for name, source in report["sources_per_step"].items():
        rate = source["target_tokens_per_s"]
        print(f"source {name}: {'n/a' if rate is None else format(rate, '.0f')} target tok/s, "
              f"wait share {source['wait_share']:.3f}, logits: {source['logits']}")
    print(f"peak memory {report['peak_memory_bytes'] / mib:.0f} MiB ({report['peak_memory_kind']})")
    steps = report["loss_steps_s"]
    print(f"loss step: fused {statistics.median(steps['fused']):.3f} s, plain LM {statistics.median(steps['plain_lm']):.3f} s, "
          f"chunked LM only {statistics.median(steps['chunked_lm_only']):.3f} s (medians)")
    print(f"wrote {out} in {report['total_s']:.0f} s (build {report['build_s']:.0f} s, setup {report['setup_s']:.0f} s; "
          f"{report['process_cpu_s']:.0f} CPU s)")
    print(f"bar: mfu {'n/a' if target['mfu'] is None else format(target['mfu'], '.3f')}")
    print(f"bar: fused_vs_lm {report['fused_vs_lm']:.3f}")
    print(f"bar: source_wait_share {report['source_wait_share']:.3f}")


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported
    result = main(arguments)
    out_path = Path(arguments.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print_report(result, out_path)
