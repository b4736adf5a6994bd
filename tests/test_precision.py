"""Precision and memory settings: their config keys, the LM-head chunk chosen from a memory budget,
source top-k without full-vocabulary logits, and the GPU step benchmark at toy size (on CPU)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import ROOT
from fusion.config import ConfigError, parse_config
from fusion.loss import auto_chunk_size, fused_lm_loss
from fusion.sources.loading import HeadChunkedForward, head_chunked
from fusion.sources.scoring import HiddenStates, next_token_topk
from fusion.config import TrainerConfig
from fusion.target import deepspeed_config, train_module

FLASH_INSTALLED = importlib.util.find_spec("flash_attn") is not None


def parse(trainer=None, source=None):
    raw = {"target": "models/target", "trainer": trainer or {}, "fusion": {"mode": "all_uniform"},
           "sources": [{"name": "a", "path": "models/a", **(source or {})}]}
    return parse_config(raw, check_paths=False)


@pytest.mark.parametrize("trainer, source, message", [
    ({"attention": "flash"}, None, r"trainer\.attention: 'flash' is not one of 'sdpa', 'flash_attention_2', 'eager'"),
    (None, {"attention": "xformers"}, r"sources\[0\]\.attention: 'xformers' is not one of"),
    ({"loss_chunk_size": 0}, None, r"trainer\.loss_chunk_size: must be >= 1 or 'auto', got 0"),
    ({"loss_chunk_size": "automatic"}, None, r"trainer\.loss_chunk_size: expected int or 'auto', got 'automatic'"),
    ({"loss_memory_mb": 0}, None, r"trainer\.loss_memory_mb: must be > 0 MB"),
    ({"activation_checkpointing": "yes"}, None, r"trainer\.activation_checkpointing: expected true or false"),
    ({"precision": "fp64"}, None, r"trainer\.precision: 'fp64' is not one of"),
    (None, {"dtype": "int8"}, r"sources\[0\]\.dtype: 'int8' is not one of"),
])
def test_bad_precision_settings_name_the_key(trainer, source, message):
    with pytest.raises(ConfigError, match=message):
        parse(trainer, source)


@pytest.mark.skipif(FLASH_INSTALLED, reason="flash-attn is installed here")
@pytest.mark.parametrize("trainer, source, key", [({"attention": "flash_attention_2", "precision": "bf16"}, None, "trainer"),
                                                  (None, {"attention": "flash_attention_2", "dtype": "bf16"}, r"sources\[0\]")])
def test_flash_attention_without_the_package_names_the_fix(trainer, source, key):
    with pytest.raises(ConfigError, match=key + r"\.attention: 'flash_attention_2' needs the flash-attn package.*pip install "
                                              r"flash-attn.*or use 'sdpa'"):
        parse(trainer, source)


@pytest.mark.skipif(not FLASH_INSTALLED, reason="flash-attn is not installed here")
def test_flash_attention_needs_16_bit_weights():
    with pytest.raises(ConfigError, match=r"trainer\.attention: 'flash_attention_2' runs in bf16 or fp16 only.*trainer\.precision"):
        parse({"attention": "flash_attention_2", "precision": "fp32"})


def test_defaults_are_full_precision_sdpa_and_explicit_chunks():
    config = parse()
    assert (config.trainer.precision, config.trainer.attention, config.trainer.activation_checkpointing) == ("fp32", "sdpa", False)
    assert (config.sources[0].dtype, config.sources[0].attention) == ("fp32", "sdpa")
    assert config.trainer.loss_chunk_size == 1024
    assert parse({"loss_chunk_size": "auto"}).trainer.loss_chunk_size == "auto"


def test_deepspeed_config_bf16_and_offload_optimizer():
    bf16 = deepspeed_config(parse({"precision": "bf16", "deepspeed_config": str(ROOT / "ds_configs/zero3.json")}), 1)
    assert bf16["bf16"] == {"enabled": True} and bf16["fp16"] == {"enabled": False}
    assert bf16["optimizer"]["params"]["torch_adam"] is True
    offload = deepspeed_config(parse({"deepspeed_config": str(ROOT / "ds_configs/zero3_offload.json")}), 1)
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offload["bf16"] == {"enabled": False}
    # DeepSpeed refuses torch's AdamW with an offloaded optimizer (zero_force_ds_cpu_optimizer).
    assert offload["optimizer"]["params"]["torch_adam"] is False


def test_activation_checkpointing_recomputes_the_layers_and_keeps_the_gradients():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1)
    input_ids = torch.randint(0, 97, (2, 11))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        module = train_module(LlamaForCausalLM(config).eval(), TrainerConfig(activation_checkpointing=checkpointing,
                                                                             loss_chunk_size="auto", loss_memory_mb=0.01))
        assert module.causal_lm.training
        calls, mlp = [], module.causal_lm.model.layers[0].mlp
        forward = mlp.forward

        def counted(*args, forward=forward, calls=calls):  # module hooks do not run in the recompute: count calls
            calls.append(1)
            return forward(*args)

        mlp.forward = counted
        hidden = module.causal_lm.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        empty = (torch.zeros(2, 11, 1, dtype=torch.long), torch.zeros(2, 11, 1), torch.zeros(2, 11, dtype=torch.bool))
        loss, _ = fused_lm_loss(hidden, module.lm_head_weight, input_ids, *empty, 1.0, module.chunk_size)
        loss.backward()
        results.append((len(calls), loss.detach(), [p.grad.clone() for p in module.parameters()]))
    (plain_calls, plain_loss, plain_grads), (checkpointed_calls, checkpointed_loss, checkpointed_grads) = results
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the layer ran again in backward
    assert torch.equal(plain_loss, checkpointed_loss)
    for a, b in zip(plain_grads, checkpointed_grads):
        assert torch.allclose(a, b, atol=1e-7)
    # auto: 0.01 MB over (4 * 97 + 16 * 16) bytes per fp32 position
    assert module.chunk_size == int(0.01 * 2**20 // (4 * 97 + 16 * 16))


# ---------------------------------------------------------------------------------------------
# Peak tensor memory of a computation, from the CPU allocator's own accounting: with
# profile_memory, every allocation and free reports the bytes allocated at that moment. Unlike the
# resident set (an earlier version of these tests) it does not move with huge pages, malloc's arenas
# or library pages, so it is the same number on every machine.

def _allocated_peak(run) -> tuple[int, object]:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = sorted((node for node in walk(prof.profiler.kineto_results.experimental_event_tree())
                     if type(node.extra_fields).__name__ == "_ExtraFields_Allocation"), key=lambda node: node.start_time_ns)
    assert events, "the profiler saw no allocation"
    first = events[0].extra_fields
    at_start = first.total_allocated - first.alloc_size
    return max(node.extra_fields.total_allocated for node in events) - at_start, result


def test_auto_chunk_size_keeps_the_chunk_buffers_within_the_budget():
    torch.manual_seed(0)
    vocab, width, rows, budget = 20011, 24, 3000, 8 * 2**20
    hidden = torch.randn(1, rows, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    labels = torch.randint(0, vocab, (1, rows))
    soft = (torch.randint(0, vocab, (1, rows, 4)), torch.full((1, rows, 4), 0.25), torch.ones(1, rows, dtype=torch.bool))
    chunk = auto_chunk_size(vocab, width, torch.float32, budget)
    assert 1 <= chunk < rows

    def step(chunk_size):
        hidden.grad = weight.grad = None
        loss, _ = fused_lm_loss(hidden, weight, labels, *soft, 0.5, chunk_size)
        loss.backward()
        return loss.detach()

    # Independent of the chunk size: both gradients, fp32 [V, H] and [N, H], held twice (built, then handed over).
    fixed = 2 * 4 * (vocab * width + rows * width)
    step(chunk)  # the first backward allocates once what later steps reuse
    peak, loss = _allocated_peak(lambda: step(chunk))
    assert peak <= budget + fixed + 2**20, (peak, budget, fixed)
    bigger_peak, bigger_loss = _allocated_peak(lambda: step(4 * chunk))
    assert bigger_peak > budget + fixed, (bigger_peak, budget, fixed)  # the budget is what limits it
    assert torch.allclose(loss, bigger_loss, rtol=1e-5)


def test_auto_chunk_size_grows_with_the_budget_and_shrinks_with_the_vocabulary():
    assert auto_chunk_size(262144, 2048, torch.bfloat16, 2**30) == 2**30 // (4 * 262144 + 12 * 2048)
    assert auto_chunk_size(1000, 8, torch.float32, 10) == 1  # never below one position
    with pytest.raises(ValueError, match="memory_bytes"):
        auto_chunk_size(1000, 8, torch.float32, 0)


# ---------------------------------------------------------------------------------------------
# Source top-k through the head, chunk by chunk, against the dense log-softmax of the model's own logits.

def tiny_model(kind: str, vocab: int, dtype=torch.float32):
    torch.manual_seed(3)
    if kind == "gemma2":  # final-logit soft-capping at 30: part of the head
        config = Gemma2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=3.0)
        return Gemma2ForCausalLM(config).to(dtype).eval()
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(config).to(dtype).eval()


def batch(vocab: int, rows: int = 3, length: int = 23):
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, vocab, (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1, 15:] = 0
    mask[2, 4:] = 0
    next_ids = torch.cat([input_ids[:, 1:], torch.full((rows, 1), -100)], 1).masked_fill(mask == 0, -100)
    next_ids[0, 7] = -100
    return input_ids, mask, next_ids


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_chunked_topk_equals_the_dense_log_softmax(kind, temperature):
    vocab, k = 1013, 7
    model = tiny_model(kind, vocab)
    forward = head_chunked(model)
    assert isinstance(forward, HeadChunkedForward)
    input_ids, mask, next_ids = batch(vocab)
    with torch.inference_mode():
        hidden = forward(input_ids=input_ids, attention_mask=mask)
        assert isinstance(hidden, HiddenStates) and hidden.shape == (3, 23, vocab)
        logprobs, ids, gold = next_token_topk(hidden, mask, next_ids, k, temperature, chunk_rows=5)
        dense = model(input_ids=input_ids, attention_mask=mask).logits.float()
    # Reference: the dense computation, position by position.
    for row in range(3):
        for t in range(23):
            if not mask[row, t]:
                assert torch.isinf(logprobs[row, t]).all() and gold[row, t] == 0
                continue
            expected = torch.log_softmax(dense[row, t] / temperature, -1)
            top = expected.topk(k)
            assert ids[row, t].tolist() == top.indices.tolist()
            assert torch.allclose(logprobs[row, t], top.values, atol=1e-5)
            target = int(next_ids[row, t])
            want = 0.0 if target < 0 else float(torch.log_softmax(dense[row, t], -1)[target])
            assert abs(float(gold[row, t]) - want) < 1e-5


def test_a_model_whose_head_is_not_reproduced_keeps_its_full_logits():
    model = tiny_model("llama", 101)
    model.config.final_logit_softcapping = None
    original = model.forward

    def scaled_forward(*args, **kwargs):  # an architecture that scales its logits after the head
        output = original(*args, **kwargs)
        output.logits = output.logits * 2.0
        return output

    model.forward = scaled_forward
    assert head_chunked(model) is model


def test_head_chunked_forward_holds_far_less_memory_than_full_logits():
    vocab, k = 32771, 5
    model = tiny_model("llama", vocab)
    input_ids, mask, next_ids = batch(vocab, rows=4, length=64)
    mask[:] = 1
    forward = head_chunked(model)

    def dense():
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            return next_token_topk(logits, mask, next_ids, k, 1.0, chunk_rows=16)

    def chunked():
        with torch.inference_mode():
            return next_token_topk(forward(input_ids=input_ids, attention_mask=mask), mask, next_ids, k, 1.0, chunk_rows=16)

    chunked()  # one-time allocations (thread pools, kernels) out of the way
    dense_peak, dense_out = _allocated_peak(dense)
    chunked_peak, chunked_out = _allocated_peak(chunked)
    logits_bytes = 4 * 64 * vocab * 4
    assert dense_peak >= logits_bytes, (dense_peak, logits_bytes)
    assert chunked_peak < dense_peak / 3, (chunked_peak, dense_peak)
    for a, b in zip(dense_out, chunked_out):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


# ---------------------------------------------------------------------------------------------

def test_gpu_step_benchmark_runs_at_toy_size_on_cpu(tmp_path, tokenizer_dirs, tiny_corpus):
    out = tmp_path / "gpu_step.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_step.py"), "--toy", "--device", "cpu", "--threads", "1",
                           "--corpus", str(tiny_corpus), "--work-dir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    bars = [line for line in done.stdout.splitlines() if line.startswith("bar: ")]
    assert [line.split()[1] for line in bars] == ["mfu", "fused_vs_lm", "source_wait_share"]
    assert bars[0] == "bar: mfu n/a"  # no bf16 peak for a CPU
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["target"]["mfu"] is None and report["precision"] == "fp32"
    assert set(report["sources_per_step"]) == {"qwen-gpt2", "llama-mistral", "gemma-wordpiece"}
    assert report["target"]["tokens_per_s"] > 0 and report["fused_vs_lm"] > 0 and report["peak_memory_bytes"] > 0
    for source in report["sources_per_step"].values():
        assert source["target_tokens_per_s"] > 0 and 0 < source["wait_share"] < 1 and source["logits"] == "head in chunks"
    assert 0 < report["source_wait_share"] < 1
