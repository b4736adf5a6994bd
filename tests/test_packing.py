"""Packed rows: the plan fits every tokenizer, no label or soft label crosses a document boundary, a packed
batch's loss is the sum of its documents' losses, and the real corpus fills rows of 2,048 tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, tiny_documents
from fusion.assets.corpus import DOMAINS
from fusion.config import SourceConfig, load_config
from fusion.data import IGNORE_INDEX, TextBatchCollator, chunk_rows, corpus_layout, load_chunked_split
from fusion.packing import best_fit_decreasing, pack_chunks
from fusion.sources.pool import ColocatedSources
from fusion.sources.scoring import encode_with_offsets
from fusion.splits import run_tokenizers
from fusion.target import TrainModule

MAX_LENGTH = 40


@pytest.fixture(scope="module")
def tokenizers(tiny_target, tiny_sources):
    return [AutoTokenizer.from_pretrained(path) for path in (tiny_target, *tiny_sources)]


@pytest.fixture(scope="module")
def chunks(tokenizers):
    texts = [text for _, text in tiny_documents(seed=5, per_domain=12)]
    domains = [domain for domain, _ in tiny_documents(seed=5, per_domain=12)]
    chunked, _ = chunk_rows(texts, domains, tokenizers, MAX_LENGTH)
    return chunked


def _alone(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=True, split_special_tokens=True)["input_ids"]


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing_fits_and_places_every_item_once(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(20, 60))
    lengths = rng.integers(1, capacity + 1, size=int(rng.integers(1, 200)))
    bins = best_fit_decreasing(lengths, capacity)
    assert sorted(item for members in bins for item in members) == list(range(len(lengths)))
    assert all(lengths[members].sum() <= capacity for members in bins)
    # A bin opens only for an item no open bin holds, so (items coming longest first) at most one bin
    # ends up at most half full.
    assert sum(int(lengths[members].sum()) * 2 <= capacity for members in bins) <= 1
    # Brute force: no two bins could have been one.
    totals = [int(lengths[members].sum()) for members in bins]
    assert all(a + b > capacity for i, a in enumerate(totals) for b in totals[i + 1:])


def test_packed_rows_fit_the_target_and_keep_domains(chunks, tokenizers):
    rows, report = pack_chunks(chunks, tokenizers[0], MAX_LENGTH, packing=True)
    assert sorted(index for row in rows["chunk_index"] for index in row) == list(range(len(chunks)))
    for texts, index, domain in zip(rows["texts"], rows["chunk_index"], rows["domain"]):
        assert texts == [chunks[i]["text"] for i in index]
        assert {chunks[i]["domain"] for i in index} == {domain}
        # Brute force: every document encoded alone, lengths added up; each fits every tokenizer alone.
        assert sum(len(_alone(tokenizers[0], text)) for text in texts) <= MAX_LENGTH
        assert all(len(_alone(tokenizer, text)) <= MAX_LENGTH for tokenizer in tokenizers for text in texts)
    assert report.rows == len(rows) < len(chunks)
    target_tokens = sum(len(_alone(tokenizers[0], text)) for text in chunks["text"])
    assert report.tokens == target_tokens
    assert report.utilisation == pytest.approx(target_tokens / (len(rows) * MAX_LENGTH))
    unpacked, alone = pack_chunks(chunks, tokenizers[0], MAX_LENGTH, packing=False)
    assert unpacked["chunk_index"] == [[i] for i in range(len(chunks))] and alone.rows == len(chunks)
    assert alone.tokens == target_tokens and report.utilisation > alone.utilisation


def test_no_label_and_no_soft_label_crosses_a_document_boundary(chunks, tokenizers, tiny_target, tiny_sources, tmp_path):
    """Against a brute force from the documents alone: the packed labels are each document's own labels at
    its place (its first token never a target), and every source's soft labels at a packed position are
    that source's answer for the document scored alone."""
    rows, _ = pack_chunks(chunks, tokenizers[0], MAX_LENGTH, packing=True)
    several = sorted(rows, key=lambda row: -len(row["texts"]))[:3]
    assert min(len(row["texts"]) for row in several) >= 2
    target = tokenizers[0]
    batch = TextBatchCollator(target, MAX_LENGTH)(several)
    specs = [SourceConfig(name=path.name, path=str(path), batch_size=2) for path in tiny_sources]
    sources = ColocatedSources(specs, target, 4, 1.0, MAX_LENGTH, tmp_path, torch.device("cpu"))
    chosen = torch.ones(len(several), len(specs), dtype=torch.bool)
    answers, arrived = sources.collect(sources.request(batch, chosen, step=1))
    assert arrived.all()
    for row, packed in enumerate(several):
        expected_ids, expected_labels, spans = [], [], []
        for text in packed["texts"]:
            ids = _alone(target, text)
            spans.append((len(expected_ids), len(expected_ids) + len(ids), text))
            expected_ids += ids
            expected_labels += [IGNORE_INDEX] + ids[1:]
        width = batch["input_ids"].shape[1]
        pad = width - len(expected_ids)
        assert batch["input_ids"][row, :len(expected_ids)].tolist() == expected_ids
        assert batch["labels"][row].tolist() == expected_labels + [IGNORE_INDEX] * pad
        assert batch["position_ids"][row].tolist() == [p for s, e, _ in spans for p in range(e - s)] + list(range(pad))
        for source, scorer in enumerate(sources.scorers):
            answer = answers[source]
            covered = torch.zeros(width, dtype=torch.bool)
            for start, end, text in spans:
                alone = scorer.score([text], encode_with_offsets(target, [text], MAX_LENGTH)[1])
                # The last position of a document predicts nothing: no soft label into the next one.
                assert not answer.valid[row, end - 1]
                assert torch.equal(answer.valid[row, start:end], alone.valid[0, :end - start])
                keep = alone.valid[0, :end - start]
                assert torch.equal(answer.indices[row, start:end][keep], alone.indices[0, :end - start][keep])
                torch.testing.assert_close(answer.logprobs[row, start:end][keep], alone.logprobs[0, :end - start][keep].float())
                covered[start:end] = True
            assert not answer.valid[row, ~covered].any()  # padding


def _soft_target(generator, length: int, vocab: int, k: int = 3):
    """A random sparse target for one document: ``[L, k]`` ids and probabilities, ``[L]`` valid (not the last position)."""
    indices = torch.randint(0, vocab, (length, k), generator=generator)
    probs = torch.rand(length, k, generator=generator).softmax(-1)
    valid = torch.rand(length, generator=generator) > 0.3
    valid[-1] = False
    return indices, probs, valid


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_batch_loss_is_the_sum_of_its_documents_losses(chunks, tokenizers, tiny_target, attention):
    """The trainer's module (TrainModule: the target's forward with restarting position ids, then the fused
    LM + soft loss) on packed rows gives the summed losses of its documents, each run alone."""
    target = tokenizers[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32, attn_implementation=attention).eval()
    module = TrainModule(model, chunk_size=17)
    rows, _ = pack_chunks(chunks, tokenizers[0], MAX_LENGTH, packing=True)
    packed = [row for row in rows if len(row["texts"]) >= 2][:4]
    collate = TextBatchCollator(target, MAX_LENGTH)
    batch = collate(packed)
    generator = torch.Generator().manual_seed(0)
    vocab = len(target)
    width = batch["input_ids"].shape[1]
    soft = (torch.zeros(len(packed), width, 3, dtype=torch.long), torch.zeros(len(packed), width, 3),
            torch.zeros(len(packed), width, dtype=torch.bool))
    separate = torch.zeros(3, dtype=torch.float64)  # total, lm, soft
    for row, packed_row in enumerate(packed):
        start = 0
        for text in packed_row["texts"]:
            alone = collate([{"text": text, "domain": packed_row["domain"]}])
            n = alone["input_ids"].shape[1]
            indices, probs, valid = _soft_target(generator, n, vocab)
            for tensor, value in zip(soft, (indices, probs, valid)):
                tensor[row, start:start + n] = value
            with torch.no_grad():
                loss, stats = module(alone["input_ids"], alone["position_ids"], alone["labels"], indices[None], probs[None],
                                     valid[None], 0.7, 1.0, 1.0)
            separate += torch.tensor([loss.item(), stats.lm_loss_sum.item(), stats.soft_loss_sum.item()], dtype=torch.float64)
            start += n
    with torch.no_grad():
        loss, stats = module(batch["input_ids"], batch["position_ids"], batch["labels"], *soft, 0.7, 1.0, 1.0)
    together = torch.tensor([loss.item(), stats.lm_loss_sum.item(), stats.soft_loss_sum.item()], dtype=torch.float64)
    torch.testing.assert_close(together, separate, rtol=1e-5, atol=1e-5)
    # Without the restarting position ids the documents would see each other: the check has teeth.
    with torch.no_grad():
        leaked, _ = module(batch["input_ids"], torch.arange(width).expand(len(packed), -1), batch["labels"], *soft, 0.7, 1.0, 1.0)
    assert abs(leaked.item() - separate[0].item()) > 1e-3


DEMO = ROOT / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def demo_packing(tmp_path_factory):
    """The demo's training split chunked at 2,048 tokens for its target and all five sources, packed."""
    if not (ROOT / "assets" / "corpus" / "dataset_dict.json").is_file():
        pytest.skip("assets/corpus is not built (make assets)")
    config = load_config(DEMO)
    tokenizers = run_tokenizers(config)
    chunks, _ = load_chunked_split(config.data.corpus, config.data.train_split, None, tokenizers, 2048,
                                   cache_dir=str(tmp_path_factory.mktemp("chunks")), **corpus_layout(config.data))
    return pack_chunks(chunks, tokenizers[0], 2048, packing=True)[1]


# Whole chunks cannot fill rows of Shakespeare: 174 of its 302 training chunks (scenes) hold more than
# 1,024 target tokens, so no two share a row (at most 0.78); meeting the bar needs documents cut to fill
# rows (docs/DESIGN.md, "Packed rows").
@pytest.mark.slow
@pytest.mark.parametrize("domain", [pytest.param(domain, marks=pytest.mark.xfail(strict=True, reason="whole chunks: <= 0.78"))
                                    if domain == "shakespeare" else domain for domain in DOMAINS])
def test_the_real_corpus_fills_rows_of_2048_tokens(demo_packing, domain):
    """Issue 14's bar: utilisation >= 0.95 at max_length 2048 in every domain of assets/corpus (chunking
    for six tokenizers takes minutes on two cores)."""
    assert demo_packing.domain_utilisation()[domain] >= 0.95
