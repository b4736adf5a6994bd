"""Offline soft labels: Arrow storage of answers, sharded precompute, resume after SIGKILL, ranks."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from transformers import AutoTokenizer
from test_scoring import byte_level_tokenizer, metaspace_tokenizer, tiny_llama

from fusion.config import SourceConfig
from fusion.data import TextBatchCollator, build_chunked_split
from fusion.precompute import precompute
from fusion.sources.loading import load_causal_lm
from fusion.sources.store import MANIFEST, load_answers, read_manifest, shard_ranges
from fusion.splits import sample, subset_rows
from fusion.sources.answer import (
    SparseSoftLabels,
    answer_features,
    from_arrow,
    to_arrow,
)
from fusion.sources.scoring import SourceScorer
from fusion.vocab_map import VocabMap

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "launch" / "precompute.py"
TOP_K = 5
MAX_LENGTH = 24
DOCUMENTS = [
    "Alpha beta gamma delta. " * 4,
    "The lazy fox jumps over the quick dog, and the dog naps in the sun all afternoon long.",
    "naïve café 🙂 and 東京 by night, then Ünïcödé once more.",
    "def f(x):\n    return x * 2\n\nprint(f(21))\n",
    "Numbers 31, 4.5 and 1e9 appear in this sentence about numbers.",
    "Short.",
    "A longer line of plain words that keeps going so that it must be cut into several chunks here.",
]


def random_answer(batch: int, length: int, k: int, seed: int) -> SparseSoftLabels:
    generator = torch.Generator().manual_seed(seed)
    return SparseSoftLabels(
        indices=torch.randint(0, 1000, (batch, length, k), generator=generator, dtype=torch.int32),
        logprobs=-torch.rand(batch, length, k, generator=generator).mul(30).to(torch.bfloat16),
        valid=torch.rand(batch, length, generator=generator) > 0.3,
        nll_per_token=torch.rand(batch, generator=generator),
        nll_per_byte=torch.rand(batch, generator=generator),
    )


def test_arrow_round_trip_keeps_each_rows_positions(tmp_path):
    answer = random_answer(3, 11, 7, seed=0)
    answer.logprobs[0, 2, 3] = float("-inf")
    lengths = [11, 4, 0]
    table = to_arrow(answer, [40, 41, 42], lengths)
    path = tmp_path / "answers.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    stored = datasets.Dataset.from_file(str(path))
    assert stored.features == answer_features(7)
    assert stored["chunk_index"][:] == [40, 41, 42]

    restored = from_arrow(stored.with_format("arrow")[1:3], length=13, dtype=torch.float32)
    assert restored.length == 13 and not restored.valid[:, 4:].any() and not restored.valid[1].any()
    assert torch.equal(restored.indices[0, :4], answer.indices[1, :4])
    assert torch.equal(restored.valid[0, :4], answer.valid[1, :4])
    # float16 keeps 11 significant bits: error ≤ |x| · 2^-11 on top of the bfloat16 input.
    torch.testing.assert_close(restored.logprobs[0, :4], answer.logprobs[1, :4].float(), atol=0, rtol=2**-11)
    assert torch.equal(restored.nll_per_byte, answer.nll_per_byte[1:])

    full = from_arrow(stored.with_format("arrow")[:])
    assert full.length == 11 and torch.isneginf(full.logprobs[0, 2, 3])
    with pytest.raises(ValueError, match="requested length"):
        from_arrow(stored.with_format("arrow")[:], length=10)


def test_answer_helpers_pad_select_and_concat():
    a, b = random_answer(2, 5, 3, seed=1), random_answer(3, 8, 3, seed=2)
    both = SparseSoftLabels.concat([a, b])
    assert (both.batch_size, both.length, both.top_k) == (5, 8, 3)
    assert not both.valid[:2, 5:].any() and torch.isneginf(both.logprobs[:2, 5:].float()).all()
    picked = both.select([4, 0])
    assert torch.equal(picked.indices[0], b.indices[2]) and torch.equal(picked.indices[1, :5], a.indices[0])
    empty = SparseSoftLabels.empty(2, 4, 3)
    assert not empty.valid.any() and torch.isnan(empty.nll_per_byte).all()
    with pytest.raises(ValueError, match="top_k"):
        SparseSoftLabels.concat([a, SparseSoftLabels.empty(1, 5, 4)])
    with pytest.raises(ValueError, match="valid"):
        SparseSoftLabels(a.indices, a.logprobs, a.valid[:, :4], a.nll_per_token, a.nll_per_byte)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Two tiny sources, a target tokenizer, a corpus on disk, and one reference CLI run."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("precompute")
    target = byte_level_tokenizer(263, bos=False)
    target.save_pretrained(root / "target")
    sources = []
    for seed, (name, tokenizer) in enumerate([("alpha", metaspace_tokenizer(157)), ("beta", byte_level_tokenizer(301, bos=True))]):
        tokenizer.save_pretrained(root / name)
        tiny_llama(len(tokenizer) + 5, seed=seed).save_pretrained(root / name)
        sources.append((name, str(root / name)))
    split = datasets.Dataset.from_dict({"text": DOCUMENTS, "domain": ["d"] * len(DOCUMENTS)})
    # With its own validation split the corpus is used as it is (a train split alone would have one carved out).
    datasets.DatasetDict({"train": split, "validation": split.select(range(1))}).save_to_disk(str(root / "corpus"))
    tiny_llama(len(target), seed=9).save_pretrained(root / "target")
    config = {
        "target": str(root / "target"),
        "run": {"output_dir": str(root / "run"), "cache_dir": str(root / "cache")},
        "sources": [{"name": name, "path": path} for name, path in sources],
        "data": {"corpus": str(root / "corpus"), "max_length": MAX_LENGTH},
        "trainer": {"deepspeed_config": str(REPO / "ds_configs" / "zero3.json")},
        "fusion": {"mode": "all_uniform", "top_k": TOP_K},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    args = ["--config", str(root / "run.yaml"), "--split", "train", "--shard-size", "3", "--batch-size", "2", "--no-progress"]
    spec = importlib.util.spec_from_file_location("launch_precompute", LAUNCHER)
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    assert launcher.main([*args, "--set", f"fusion.answers_dir={root / 'reference'}", "--rank", "0", "--world-size", "1"]) == 0
    tokenizers = [target] + [tokenizer_of(path) for _, path in sources]
    corpus, _ = build_chunked_split(split, tokenizers, MAX_LENGTH)
    return {"root": root, "args": args, "sources": sources, "target": target, "corpus": corpus, "launcher": launcher}


def tokenizer_of(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def output_files(out_dir: Path) -> dict[str, bytes]:
    """Every file of the answers (manifests, shards, and any leftover temporary file)."""
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in sorted(out_dir.glob("*/*")) if p.parent.name != "vocab_maps"}


def test_reference_run_writes_every_shard_and_manifest(workspace):
    corpus = workspace["corpus"]
    for name, _ in workspace["sources"]:
        manifest = read_manifest(workspace["root"] / "reference" / name)
        ranges = shard_ranges(len(corpus), 3)
        assert [(s["start"], s["stop"]) for s in manifest["shards"]] == ranges and len(ranges) >= 4
        assert manifest["top_k"] == TOP_K and manifest["num_rows"] == len(corpus) == sum(s["num_rows"] for s in manifest["shards"])
        stored = load_answers(workspace["root"] / "reference" / name)
        assert stored["chunk_index"][:] == list(range(len(corpus)))


def direct_answer(workspace, path, dtype, rows):
    """The scorer's answer for ``rows`` of the corpus, the model loaded here in ``dtype``."""
    model, source_tokenizer = load_causal_lm(path, dtype), AutoTokenizer.from_pretrained(path)
    vocab_map = VocabMap.build(source_tokenizer, workspace["target"], model.config.vocab_size)
    scorer = SourceScorer(model, source_tokenizer, workspace["target"], vocab_map, top_k=TOP_K, max_length=MAX_LENGTH)
    return scorer.score([workspace["corpus"][r]["text"] for r in rows])


def assert_stored_equal(answers_dir, rows, direct):
    stored = load_answers(answers_dir).with_format("arrow")
    loaded = from_arrow(pa.concat_tables([stored[r : r + 1] for r in rows]), length=direct.length)
    assert torch.equal(loaded.indices, direct.indices) and torch.equal(loaded.valid, direct.valid)
    torch.testing.assert_close(loaded.logprobs.float(), direct.logprobs.float(), atol=2e-3, rtol=0)
    torch.testing.assert_close(loaded.nll_per_byte, direct.nll_per_byte)


def test_stored_answers_equal_direct_scoring(workspace):
    """Rows on disk (joined by chunk_index) equal the scorer's answer for the same chunks."""
    name, path = workspace["sources"][0]
    rows = [0, 4, 5]
    assert_stored_equal(workspace["root"] / "reference" / name, rows, direct_answer(workspace, path, torch.float32, rows))


def test_each_source_runs_in_its_own_dtype_and_attention(workspace, tmp_path, monkeypatch):
    """A bf16 source with eager attention beside an fp32 one with sdpa: the models precompute runs
    are in those dtypes and attention implementations, the fp32 source's answers equal direct
    scoring, and the manifest records the dtype."""
    import fusion.precompute

    ran = {}

    def load_and_record(path, dtype, attention="sdpa"):
        model = load_causal_lm(path, dtype, attention)
        ran[Path(path).name] = (model.dtype, model.config._attn_implementation)
        return model

    monkeypatch.setattr(fusion.precompute, "load_causal_lm", load_and_record)
    (alpha, alpha_path), (beta, beta_path) = workspace["sources"]
    sources = [SourceConfig(alpha, alpha_path, dtype="bf16", attention="eager"), SourceConfig(beta, beta_path)]
    precompute(sources, workspace["target"], workspace["corpus"], tmp_path, max_length=MAX_LENGTH, shard_size=3,
               top_k=TOP_K, batch_size=2, progress=False)
    assert ran == {alpha: (torch.bfloat16, "eager"), beta: (torch.float32, "sdpa")}
    rows = list(range(len(workspace["corpus"])))
    assert_stored_equal(tmp_path / beta, rows, direct_answer(workspace, beta_path, torch.float32, rows))
    assert [read_manifest(tmp_path / name)["dtype"] for name in (alpha, beta)] == ["bf16", "fp32"]
    with pytest.raises(ValueError, match="dtype: 'bf16' there vs 'fp32' now"):  # no mixing of answers across dtypes
        precompute([SourceConfig(alpha, alpha_path)], workspace["target"], workspace["corpus"], tmp_path,
                   max_length=MAX_LENGTH, shard_size=3, top_k=TOP_K, batch_size=2, progress=False)


def test_bytes_per_token_within_budget(workspace, tmp_path):
    """Disk bytes per stored token ≤ 8·k for a shard holding all of this corpus's rows, once the
    schema written at the head of every file (a fixed cost, not per token) is set aside."""
    schema = answer_features(TOP_K).arrow_schema

    def file_size(table: pa.Table) -> int:
        path = tmp_path / "shard.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_table(table)
        return path.stat().st_size

    schema_bytes = file_size(schema.empty_table())
    for name, _ in workspace["sources"]:
        stored = load_answers(workspace["root"] / "reference" / name)
        tokens = sum(len(v) for v in stored["valid"])
        per_token = (file_size(stored.data.table.combine_chunks()) - schema_bytes) / tokens
        # 6·k bytes of candidates per token, plus per-row offsets, chunk index and NLLs.
        assert 6 * TOP_K <= per_token <= 8 * TOP_K, f"{name}: {per_token:.1f} bytes per token"


def test_resume_after_sigkill_is_byte_identical(workspace):
    root = workspace["root"]
    out = root / "resumed"
    first_source = out / workspace["sources"][0][0]
    # The interrupted run sleeps before each forward pass, so it is still busy when killed.
    slow = (
        "import runpy, sys, time, torch\n"
        "torch.set_num_threads(1)\n"
        "import fusion.sources.scoring as scoring\n"
        "score = scoring.SourceScorer.score\n"
        "def slow_score(self, *args, **kwargs):\n"
        "    time.sleep(0.3)\n"
        "    return score(self, *args, **kwargs)\n"
        "scoring.SourceScorer.score = slow_score\n"
        f"sys.argv = [{str(LAUNCHER)!r}] + sys.argv[1:]\n"
        f"runpy.run_path({str(LAUNCHER)!r}, run_name='__main__')\n"
    )
    command = [*workspace["args"], "--set", f"fusion.answers_dir={out}", "--rank", "0", "--world-size", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-c", slow, *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(first_source.glob("shard-*.arrow")):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no shard was completed within 60 s"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    completed = sorted(first_source.glob("shard-*.arrow"))
    total = len(read_manifest(first_source)["shards"])
    assert 1 <= len(completed) < total
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in completed}

    # Resuming in this process saves a second interpreter start (most of this test's time).
    assert workspace["launcher"].main(command) == 0
    assert before == {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in completed}, "a completed shard was rewritten"
    assert output_files(out) == output_files(root / "reference")


def test_two_ranks_in_parallel_match_one_rank(workspace):
    root = workspace["root"]
    out = root / "two_ranks"
    errors = []

    def run(rank: int) -> None:
        try:
            precompute(
                [SourceConfig(name, path) for name, path in workspace["sources"]], workspace["target"], workspace["corpus"], out, max_length=MAX_LENGTH,
                shard_size=3, top_k=TOP_K, batch_size=2, rank=rank, world_size=2, progress=False,
            )
        except Exception as error:  # re-raised in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    assert output_files(out) == output_files(root / "reference")


def test_other_settings_in_an_existing_folder_are_refused(workspace):
    with pytest.raises(ValueError, match="top_k"):
        precompute(
            [SourceConfig(*workspace["sources"][0])], workspace["target"], workspace["corpus"], workspace["root"] / "reference",
            max_length=MAX_LENGTH, shard_size=3, top_k=TOP_K + 1, progress=False,
        )


def test_load_answers_names_missing_shards(workspace, tmp_path):
    source = workspace["root"] / "reference" / workspace["sources"][1][0]
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / MANIFEST).write_bytes((source / MANIFEST).read_bytes())
    first = read_manifest(source)["shards"][0]["file"]
    (partial / first).write_bytes((source / first).read_bytes())
    with pytest.raises(ValueError, match="rerun launch/precompute.py"):
        load_answers(partial)
    assert np.array_equal(
        datasets.Dataset.from_file(str(partial / first))["chunk_index"][:], np.arange(3)
    )


def test_subset_rows_are_the_trainers_sample():
    """The rows a trainer keeps with data.max_train_chunks: ``limit`` distinct rows of the split, fixed by
    the seed, and exactly the rows of ``sample``, which the trainer and evaluation read."""
    chunks = datasets.Dataset.from_dict({"chunk_index": list(range(37))})
    draws = {seed: subset_rows(37, 11, seed) for seed in (0, 5)}
    for seed, rows in draws.items():
        assert len(set(rows)) == 11 and all(0 <= row < 37 for row in rows)
        assert rows == subset_rows(37, 11, seed)
        assert sample(chunks, 11, seed)["chunk_index"] == rows
    assert draws[0] != draws[5]
    assert subset_rows(37, None, 0) is None and subset_rows(37, 37, 0) is None
    assert len(sample(chunks, 37, 0)) == 37


def test_max_train_chunks_subset_is_read_by_chunk_index(workspace):
    """precompute honours data.max_train_chunks / data.subset_seed; OfflineSources finds rows by chunk_index."""
    from fusion.config import ConfigError, SourceConfig
    from fusion.sources.pool import OfflineSources

    root, corpus = workspace["root"], workspace["corpus"]
    out = root / "subset"
    limit, seed = 5, 3
    assert workspace["launcher"].main([*workspace["args"], "--set", f"fusion.answers_dir={out}", "--set",
                                       f"data.max_train_chunks={limit}", "--set", f"data.subset_seed={seed}"]) == 0
    kept = sample(corpus.add_column("chunk_index", list(range(len(corpus)))), limit, seed)["chunk_index"]
    name, path = workspace["sources"][0]
    assert load_answers(out / name)["chunk_index"][:] == kept

    specs = [SourceConfig(name=name, path=path)]
    offline = OfflineSources(specs, out, workspace["target"], TOP_K, 1.0, corpus)
    reference = load_answers(root / "reference" / name).with_format("arrow")
    rows = [kept[3], kept[0]]
    collate = TextBatchCollator(workspace["target"], MAX_LENGTH)
    batch = collate([{**corpus[row], "chunk_index": row} for row in rows])
    chosen = torch.ones(2, 1, dtype=torch.bool)
    answers, arrived = offline.collect(offline.request(batch, chosen, step=1))
    answer = answers[0]
    assert torch.equal(arrived, chosen)
    expected = from_arrow(pa.concat_tables([reference[r : r + 1] for r in rows]), batch["input_ids"].shape[1], torch.float32)
    assert torch.equal(answer.indices, expected.indices) and torch.equal(answer.valid, expected.valid)
    missing = next(row for row in range(len(corpus)) if row not in kept)
    with pytest.raises(ConfigError, match=f"lack chunk {missing}"):
        offline.collect(offline.request(collate([{**corpus[row], "chunk_index": row} for row in (missing, rows[0])]), chosen, step=1))


def test_packed_rows_read_their_chunks_answers_live_and_offline(workspace):
    """A packed row's answer is each of its chunks' answers (scored alone) at the chunk's positions in the
    row, nothing at a chunk's last position, and the rows' NLLs the byte-weighted means of their chunks':
    the same from offline answers and from colocated sources."""
    from fusion.config import SourceConfig
    from fusion.sources.pool import ColocatedSources, OfflineSources

    corpus, target = workspace["corpus"], workspace["target"]
    lengths = [len(target(text, split_special_tokens=True)["input_ids"]) for text in corpus["text"]]
    # Two rows: three short chunks packed together, and one chunk alone.
    order = sorted(range(len(corpus)), key=lambda row: lengths[row])
    packed = []
    for row in order:
        if sum(lengths[r] for r in packed) + lengths[row] <= MAX_LENGTH and len(packed) < 3:
            packed.append(row)
    assert len(packed) >= 2
    alone = order[-1]
    batch = TextBatchCollator(target, MAX_LENGTH)([
        {"texts": [corpus[row]["text"] for row in packed], "chunk_index": packed, "domain": "d"},
        {**corpus[alone], "chunk_index": alone}])
    chosen = torch.ones(2, len(workspace["sources"]), dtype=torch.bool)
    specs = [SourceConfig(name=name, path=path) for name, path in workspace["sources"]]
    offline = OfflineSources(specs, workspace["root"] / "reference", target, TOP_K, 1.0, corpus)
    live = ColocatedSources(specs, target, TOP_K, 1.0, MAX_LENGTH, workspace["root"] / "cache", torch.device("cpu"))
    offline_answers, arrived = offline.collect(offline.request(batch, chosen, step=1))
    live_answers, live_arrived = live.collect(live.request(batch, chosen, step=1))
    assert arrived.all() and live_arrived.all()
    width = batch["input_ids"].shape[1]
    for (name, _), from_disk, from_models in zip(workspace["sources"], offline_answers, live_answers):
        stored = load_answers(workspace["root"] / "reference" / name).with_format("arrow")
        # Brute force: lay each chunk's stored answer out at its place in its row.
        expected = SparseSoftLabels.empty(2, width, TOP_K, torch.float32)
        for row, members in ((0, packed), (1, [alone])):
            start, nats, total_bytes = 0, torch.zeros(2, dtype=torch.float64), 0
            for chunk in members:
                own = from_arrow(stored[chunk : chunk + 1], None, torch.float32)
                n = lengths[chunk]
                assert not own.valid[0, n - 1:].any()  # a chunk's last position predicts nothing inside it
                expected.indices[row, start:start + n] = own.indices[0, :n]
                expected.logprobs[row, start:start + n] = own.logprobs[0, :n]
                expected.valid[row, start:start + n] = own.valid[0, :n]
                size = len(corpus[chunk]["text"].encode("utf-8"))
                nats += size * torch.tensor([own.nll_per_token[0].item(), own.nll_per_byte[0].item()], dtype=torch.float64)
                start, total_bytes = start + n, total_bytes + size
            expected.nll_per_token[row], expected.nll_per_byte[row] = (nats / total_bytes).float()
        assert torch.equal(from_disk.indices, expected.indices) and torch.equal(from_disk.valid, expected.valid)
        assert torch.equal(from_disk.logprobs, expected.logprobs)
        torch.testing.assert_close(from_disk.nll_per_byte, expected.nll_per_byte)
        torch.testing.assert_close(from_disk.nll_per_token, expected.nll_per_token)
        assert torch.equal(from_models.indices, expected.indices) and torch.equal(from_models.valid, expected.valid)
        torch.testing.assert_close(from_models.logprobs, expected.logprobs, atol=2e-3, rtol=0)
        torch.testing.assert_close(from_models.nll_per_byte, from_disk.nll_per_byte)


def test_cut_packed_rows_read_their_pieces_answers_offline_as_live(workspace):
    """When packing cuts chunks, launch/precompute.py stores one answer per piece (the trainer's documents), and
    a packed batch of pieces reads from disk what the sources give live for each piece scored alone."""
    from fusion.config import ConfigError, SourceConfig, load_config
    from fusion.sources.pool import ColocatedSources, OfflineSources
    from fusion.splits import run_chunks, run_tokenizers

    root, target = workspace["root"], workspace["target"]
    out = root / "pieces"
    cutting = ["data.packing=true", "data.min_piece_tokens=6"]
    assert workspace["launcher"].main([*workspace["args"], "--set", f"fusion.answers_dir={out}",
                                       *(arg for setting in cutting for arg in ("--set", setting))]) == 0
    config = load_config(root / "run.yaml", cutting)
    chunks = run_chunks(config, run_tokenizers(config))
    pieces = chunks.documents
    assert len(pieces) > len(chunks.train)  # some chunks were cut
    for name, _ in workspace["sources"]:
        assert load_answers(out / name)["chunk_index"][:] == list(range(len(pieces)))
    cut = {n for n, piece in enumerate(pieces) if piece["text"] != chunks.train_split[piece["chunk_index"]]["text"]}
    rows = sorted(chunks.train_rows, key=lambda row: (-len(cut & set(row["chunk_index"])), -len(row["texts"])))[:3]
    assert cut & {index for row in rows for index in row["chunk_index"]} and max(len(row["texts"]) for row in rows) >= 2
    batch = TextBatchCollator(target, MAX_LENGTH)(rows)
    specs = [SourceConfig(name=name, path=path) for name, path in workspace["sources"]]
    offline = OfflineSources(specs, out, target, TOP_K, 1.0, pieces)
    live = ColocatedSources(specs, target, TOP_K, 1.0, MAX_LENGTH, root / "cache", torch.device("cpu"))
    chosen = torch.ones(len(rows), len(specs), dtype=torch.bool)
    from_disk, arrived = offline.collect(offline.request(batch, chosen, step=1))
    from_models, live_arrived = live.collect(live.request(batch, chosen, step=1))
    assert arrived.all() and live_arrived.all()
    for disk, models in zip(from_disk, from_models):
        assert torch.equal(disk.indices[disk.valid], models.indices[models.valid]) and torch.equal(disk.valid, models.valid)
        torch.testing.assert_close(disk.logprobs, models.logprobs, atol=2e-3, rtol=0)
        torch.testing.assert_close(disk.nll_per_byte, models.nll_per_byte, atol=2e-3, rtol=0)
    # Answers per chunk are not answers per piece: the run is refused by name, not fed the wrong ones.
    with pytest.raises(ConfigError, match="corpus_sha256"):
        OfflineSources(specs, root / "reference", target, TOP_K, 1.0, pieces)
