"""The user's own corpora: every format load_chunked_split reads, the carved-out eval split, and
the one-line ConfigError each bad input gives."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from conftest import tiny_documents
from fusion.config import ConfigError, parse_config
from fusion.data import HELD_OUT_FRACTION, check_corpus, held_out_rows, load_chunked_split, read_split

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 24


def _rows(labelled: bool) -> list[dict]:
    """60 short documents over three domains, plus a copy of one text and one unusable row."""
    rows = [{"body": text, "topic": domain} for domain, text in tiny_documents(seed=4, per_domain=20)]
    rows.append(dict(rows[3]))
    rows.append({"body": "   ", "topic": rows[0]["topic"]})
    if not labelled:
        rows = [{"body": row["body"]} for row in rows]
    return rows


def _write(kind: str, rows: list[dict], path: Path) -> Path:
    """``rows`` as a corpus of format ``kind`` at ``path`` (a file or a folder); returns the corpus path."""
    fields = list(rows[0])
    if kind == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif kind == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(rows, indent=1))
    elif kind == "jsonl-folder":
        path.mkdir()
        for part in range(3):
            (path / f"part-{part}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[part::3]))
    elif kind == "parquet":
        path = path.with_suffix(".parquet")
        pq.write_table(pa.table({field: [row[field] for row in rows] for field in fields}), path)
    elif kind == "csv":
        path = path.with_suffix(".csv")
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "text":
        path.mkdir()
        for index, row in enumerate(rows):
            (path / f"{index:03d}.txt").write_text(row["body"])
    elif kind == "dataset":
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif kind == "dataset-dict":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    else:
        raise AssertionError(kind)
    return path


@pytest.fixture(scope="module")
def tokenizers(tokenizer_dirs) -> list:
    """Two real families: byte-level BPE (adds nothing) and lower-casing WordPiece (adds CLS/SEP)."""
    return [AutoTokenizer.from_pretrained(tokenizer_dirs[name]) for name in ("smollm2", "minilm-wordpiece")]


def _file_order(kind: str, rows: list[dict]) -> list[dict]:
    """The order in which a corpus of ``kind`` holds ``rows`` (a folder of parts is read part by part)."""
    return [row for part in range(3) for row in rows[part::3]] if kind == "jsonl-folder" else rows


KINDS = ("jsonl", "json", "jsonl-folder", "parquet", "csv", "dataset", "dataset-dict")


# Plain-text files carry no domain.
@pytest.mark.parametrize(("kind", "labelled"), [(kind, labelled) for kind in KINDS for labelled in (True, False)] + [("text", False)])
def test_every_format_loads_splits_and_chunks(tmp_path, tokenizers, kind, labelled):
    rows = _rows(labelled)
    corpus = str(_write(kind, rows, tmp_path / "corpus"))
    fields = {"text_field": "text" if kind == "text" else "body", "domain_field": "topic" if labelled else None}
    train = read_split(corpus, "train", **fields)
    held = read_split(corpus, "validation", **fields)

    expected = [(row["body"], row["topic"] if labelled else "all") for row in _file_order(kind, rows)]
    assert Counter(zip(*train)) + Counter(zip(*held)) == Counter(expected)
    assert not set(train[0]) & set(held[0])
    usable, held_texts = {}, {}
    for text, domain in expected:
        if text.strip():
            usable.setdefault(domain, set()).add(text)
    for text, domain in zip(*held):
        held_texts.setdefault(domain, set()).add(text)
    assert {domain: len(texts) for domain, texts in held_texts.items()} == {
        domain: max(1, round(HELD_OUT_FRACTION * len(texts))) for domain, texts in usable.items()}
    assert held[0].count(rows[3]["body"]) in (0, 2)  # copies of a text stay together

    for split, (texts, domains) in (("train", train), ("validation", held)):
        chunks, report = load_chunked_split(corpus, split, None, tokenizers, MAX_LENGTH, **fields)
        # Chunks keep row order and concatenate, per row, to the stripped text.
        assert "".join(chunks["text"]) == "".join(text.strip() for text in texts)
        assert set(chunks["domain"]) == {domain for text, domain in zip(texts, domains) if text.strip()}
        for tokenizer in tokenizers:
            assert max(len(ids) for ids in tokenizer(list(chunks["text"]))["input_ids"]) <= MAX_LENGTH
        assert report.skipped == ({"empty": 1} if "   " in texts else {})


def test_carve_is_stable_whatever_the_row_order_and_process(tmp_path):
    rows = _rows(labelled=True)
    forward = str(_write("jsonl", rows, tmp_path / "forward"))
    backward = str(_write("jsonl", rows[::-1], tmp_path / "backward"))
    held = read_split(forward, "validation", text_field="body", domain_field="topic")
    assert sorted(zip(*held)) == sorted(zip(*read_split(backward, "validation", text_field="body", domain_field="topic")))
    # Another process (another rank, another run) carves the same rows: no per-process hash seed.
    script = ("import json, sys; from fusion.data import read_split; "
              "print(json.dumps(read_split(sys.argv[1], 'validation', text_field='body', domain_field='topic')))")
    other = subprocess.run([sys.executable, "-c", script, forward], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(other.stdout.strip().splitlines()[-1]) == [list(held[0]), list(held[1])]


def test_held_out_rows_hand_computed_counts():
    texts = [f"text {i}" for i in range(41)] + ["lonely"]
    domains = ["a"] * 20 + ["b"] * 21 + ["c"]
    held = held_out_rows(texts, domains)
    # round(0.05 * 20) = 1, round(0.05 * 21) = 1, a domain of one text keeps it for training.
    assert Counter(domains[i] for i in held) == {"a": 1, "b": 1}
    many = held_out_rows([f"t{i}" for i in range(200)], ["d"] * 200)
    assert len(many) == 10 and many == sorted(many)
    # Unusable rows are never held out.
    assert held_out_rows([None, "", "x", "y"], ["d"] * 4) in ([2], [3])


def test_existing_splits_are_used_as_they_are(tiny_corpus, tokenizers):
    """A DatasetDict with its own eval split: nothing is carved; other splits are read too."""
    corpus = datasets.load_from_disk(str(tiny_corpus))
    assert read_split(str(tiny_corpus), "validation") == (list(corpus["validation"]["text"]), list(corpus["validation"]["domain"]))
    assert read_split(str(tiny_corpus), "test")[0] == list(corpus["test"]["text"])
    with pytest.raises(KeyError, match=r"split 'dev' is not in .* \(it has \['test', 'train', 'validation'\]\)"):
        read_split(str(tiny_corpus), "dev")
    chunks, _ = load_chunked_split(str(tiny_corpus), "validation", ["numbers"], tokenizers, MAX_LENGTH)
    assert set(chunks["domain"]) == {"numbers"}
    with pytest.raises(KeyError, match=r"domains \['planets'\] are not in"):
        load_chunked_split(str(tiny_corpus), "validation", ["planets"], tokenizers, MAX_LENGTH)


def test_single_dataset_errors_stay_short(tmp_path):
    """A single Dataset once gave an error holding every row (101 KB for 80 rows)."""
    corpus = str(_write("dataset", _rows(labelled=True), tmp_path / "one"))
    with pytest.raises(KeyError) as caught:
        read_split(corpus, "test", text_field="body")
    assert "has no splits" in str(caught.value) and len(str(caught.value)) < 400


def test_invalid_unicode_in_files_is_skipped_and_counted(tmp_path, tokenizers):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "good.txt").write_text("A good document.")
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (folder / "bom.txt").write_bytes(b"\xef\xbb\xbfWith a byte order mark.")
    lines = tmp_path / "rows.jsonl"
    lines.write_text('{"text": "fine"}\n{"text": "lone \\ud800 surrogate"}\n{"text": "also fine"}\n')
    table = tmp_path / "rows.csv"
    table.write_bytes(b"text\nfine\nbad \xff byte\nalso fine\n")
    for corpus, kept in ((folder, ["A good document.", "With a byte order mark."]), (lines, ["fine", "also fine"]), (table, ["fine", "also fine"])):
        texts = read_split(str(corpus), "train")[0] + read_split(str(corpus), "validation")[0]
        chunks, report = zip(*(load_chunked_split(str(corpus), split, None, tokenizers, MAX_LENGTH) for split in ("train", "validation")))
        assert sorted(chunk for part in chunks for chunk in part["text"]) == sorted(kept)
        assert sum(part.skipped["bad_unicode"] for part in report) == 1, corpus
        assert len(texts) == len(kept) + 1


def test_integer_labels_become_str_and_all_is_reserved(tmp_path):
    corpus = tmp_path / "ints.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"row {i}", "label": i % 2}) + "\n" for i in range(6)))
    assert set(read_split(str(corpus), "train", domain_field="label")[1]) == {"0", "1"}
    clash = tmp_path / "clash.jsonl"
    clash.write_text("".join(json.dumps({"text": f"row {i}", "domain": ["all", "news"][i % 2]}) + "\n" for i in range(6)))
    with pytest.raises(ConfigError, match=r"data\.domain_field: the domain label 'all' .* reserved"):
        read_split(str(clash), "train")


def _message(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and len(message) < 500 and "Traceback" not in message
    return message


def test_bad_inputs_name_the_key_and_the_fix(tmp_path, tokenizers):
    rows = _rows(labelled=True)
    good = str(_write("jsonl", rows, tmp_path / "good"))
    cases = []
    cases.append((lambda: check_corpus(str(tmp_path / "missing.jsonl")), r"^data\.corpus: .*missing\.jsonl' does not exist; use \.jsonl"))
    (tmp_path / "table.tsv").write_text("text\nx\n")
    cases.append((lambda: check_corpus(str(tmp_path / "table.tsv")), r"^data\.corpus: .*table\.tsv' is not a corpus file; use"))
    (tmp_path / "empty").mkdir()
    cases.append((lambda: check_corpus(str(tmp_path / "empty")), r"^data\.corpus: folder .* holds no files"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text('{"text": "x"}\n')
    (mixed / "b.csv").write_text("text\nx\n")
    cases.append((lambda: check_corpus(str(mixed)), r"^data\.corpus: folder .* mixes csv and json files"))
    partly = tmp_path / "partly"
    partly.mkdir()
    (partly / "a.jsonl").write_text('{"text": "x", "domain": "news"}\n')
    (partly / "b.jsonl").write_text('{"text": "y"}\n')
    cases.append((lambda: check_corpus(str(partly)), r"^data\.domain_field: .*a\.jsonl' has a 'domain' field but .*b\.jsonl' has none"))
    cases.append((lambda: check_corpus(good), r"^data\.text_field: .* has no field 'text' \(it has \['body', 'topic'\]\); set data\.text_field"))
    cases.append((lambda: check_corpus(good, "body", "domain"), r"^data\.domain_field: .* has no field 'domain'"))
    texts = _write("text", rows, tmp_path / "texts")
    cases.append((lambda: check_corpus(str(texts), "body"), r"^data\.text_field: plain-text corpora .* remove data\.text_field"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "x"}\n{"text": \n')
    cases.append((lambda: read_split(str(broken), "train"), r"^data\.corpus: .*broken\.jsonl' line 2: not valid JSON"))
    listed = tmp_path / "listed.jsonl"
    listed.write_text('["just", "strings"]\n')
    cases.append((lambda: check_corpus(str(listed)), r"^data\.corpus: .* row 1 is a list, not an object of fields"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    cases.append((lambda: check_corpus(str(tmp_path / "junk.parquet")), r"^data\.corpus: .* is not a readable Parquet file"))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("".join(json.dumps({"text": " "}) + "\n" for _ in range(5)))
    cases.append((lambda: load_chunked_split(str(blank), "train", None, tokenizers, MAX_LENGTH),
                  r"^data\.corpus: split 'train' of .* gives no text: 5 rows, skipped \{'empty': 5\}"))
    single = tmp_path / "single.jsonl"
    single.write_text('{"text": "only one"}\n')
    cases.append((lambda: read_split(str(single), "validation"), r"^data\.eval_split: .* too few rows to carve one out"))
    damaged = tmp_path / "damaged"
    _write("dataset-dict", rows, damaged)
    (damaged / "train" / "state.json").write_text("{")
    cases.append((lambda: check_corpus(str(damaged)), r"^data\.corpus: .* is not a readable save_to_disk folder"))
    for call, pattern in cases:
        with pytest.raises(ConfigError) as caught:
            call()
        assert re.search(pattern, _message(caught)), (pattern, str(caught.value))


def test_config_checks_the_corpus_before_anything_loads(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"vocab_size": 50, "max_position_embeddings": 128}')
    (model / "model.safetensors").write_bytes(b"")  # the config check reads no weights
    (model / "tokenizer.json").write_text("{}")
    corpus = str(_write("csv", _rows(labelled=True), tmp_path / "corpus"))
    raw = {"target": str(model), "data": {"corpus": corpus, "text_field": "body", "domain_field": "topic"},
           "trainer": {"deepspeed_config": str(REPO / "ds_configs" / "zero3.json")}}
    assert parse_config(raw).data.text_field == "body"
    raw["data"]["text_field"] = "text"
    with pytest.raises(ConfigError, match=r"^data\.text_field: .*corpus\.csv' has no field 'text'"):
        parse_config(raw)
    raw["data"]["text_field"] = "topic"
    with pytest.raises(ConfigError, match=r"^data\.domain_field: 'topic' is also data\.text_field"):
        parse_config(raw, check_paths=False)
    raw["data"].update(text_field="body", eval_split="train")
    with pytest.raises(ConfigError, match=r"^data\.eval_split: 'train' is also data\.train_split"):
        parse_config(raw, check_paths=False)


@pytest.mark.parametrize("kind, labelled", [("jsonl", False), ("parquet", True), ("csv", True), ("text", False)])
def test_a_run_trains_on_a_corpus_of_every_format(tmp_path, tiny_target, kind, labelled):
    """``deepspeed launch/train.py`` end to end on the user's own files (eval split carved out)."""
    from experiments.local_runs import free_port

    corpus = _write(kind, _rows(labelled), tmp_path / "corpus")
    data = {"corpus": str(corpus), "max_length": 48, "text_field": "text" if kind == "text" else "body"}
    if labelled:
        data["domain_field"] = "topic"
    config = {"target": str(tiny_target), "data": data,
              "run": {"output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache")},
              "trainer": {"deepspeed_config": str(REPO / "ds_configs/zero3.json"), "max_steps": 2, "lr": 1e-3,
                          "warmup_steps": 1, "micro_batch_size": 1, "eval_batches": 1, "num_threads": 1}}
    (tmp_path / "run.yaml").write_text(json.dumps(config))
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, str(REPO / "launch/train.py"), "--config", str(tmp_path / "run.yaml")],
                            capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, **env})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "result.json").read_text())
    domains = {domain for domain, _ in tiny_documents(seed=4, per_domain=1)} if labelled else {"all"}
    assert set(summary["eval"]) == set(summary["eval_before"]) == domains
    assert summary["steps"] == 2 and summary["tokens"] > 0
