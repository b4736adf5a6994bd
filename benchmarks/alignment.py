"""Token alignment benchmark: shared-boundary alignment (fusion.alignment) vs FuseLLM's DTW.

For every ordered pair of the real tokenizer families in ``assets/tokenizers``, on the same texts of
1,024 tokens of a reference tokenizer (cut from the corpus in ``assets/corpus``, else from the
Python standard library's sources and a few built-in paragraphs), it measures

* speed in target positions per second, offsets or token strings given (tokenisation excluded):
  ours; FuseLLM's dynamic time warping over the two token-string sequences with per-token edit
  distance as the cost, written as FuseLLM writes it (``FuseLLM/src/utils/others.py``: Python loops
  over a numpy matrix); and the same DTW vectorised (rapidfuzz ``cdist`` for the costs, numpy over
  anti-diagonals), to show that the gap is not only Python against C;
* the share of target positions that get a source distribution (see ``definitions`` in the JSON).

The bar: ours at least 50 times faster than FuseLLM's DTW and valid at no smaller a share of
positions than DTW's one-to-one matches with a matching boundary, for every pair. The last line
printed is ``bar: speedup_vs_dtw <smallest speedup over the pairs>``; the exit status is 0 whether
or not the bar is met.

    python benchmarks/alignment.py [--out benchmarks/results/alignment.json] [--texts 8] [--dtw-texts 2] [--vocab-maps]

``--vocab-maps`` also times building the vocabulary maps (fusion.vocab_map) of every pair.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusion.alignment import TokenSpelling, align_next_token_positions, token_boundaries  # noqa: E402

FAMILIES = ("smollm2", "gemma3", "gpt2", "mistral-v1", "minilm-wordpiece")
TOKENS_PER_TEXT = 1024
BAR_SPEEDUP = 50.0

DEFINITIONS = {
    "positions_per_s": "target positions aligned per second of wall time on one thread, tokenisation "
                       "excluded (ours: fast-tokenizer ids and offsets and each tokenizer's TokenSpelling given; DTW: token strings given, edit "
                       "distances included); ours is the best of --repeats runs per text",
    "valid_share (ours)": "share of target positions t < L_tgt - 1 with a source position j whose next "
                          "token starts where target token t + 1 starts (fusion.alignment)",
    "dtw_one_to_one_share": "share of target positions t < L_tgt - 1 whose token t DTW matches to exactly "
                            "one source token j: FuseLLM's criterion (len(base_to_blending[t]) == 1) for "
                            "giving position t the source distribution at j",
    "dtw_valid_share": "share of target positions t < L_tgt - 1 matched one-to-one by DTW to a source "
                       "token j whose next token j + 1 starts at the character where target token t + 1 "
                       "starts (a matching boundary, so that both distributions predict the same text)",
    "dtw_wrong_boundary_share": "dtw_one_to_one_share - dtw_valid_share: one-to-one matches whose source "
                                "distribution predicts text starting elsewhere",
    "ours_covers_dtw_valid": "every DTW-valid position is valid for us and aligned to the same source "
                             "position",
    "speedup_vs_dtw": "ours positions_per_s / FuseLLM DTW positions_per_s",
    "bar": f"speedup_vs_dtw >= {BAR_SPEEDUP:g} and valid_share >= dtw_valid_share, for every pair",
}

BUILT_IN_PARAGRAPHS = [
    "The universe comprises all of existence: all forms of matter and energy, and the structures they form, "
    "from sub-atomic particles to entire galactic filaments. Since the early 20th century, cosmology has "
    "established that the universe has been expanding for 13.8 billion years.",
    "Café owners in São Paulo served naïve tourists crème brûlée; 東京 and 北京 are capitals; emoji 😀👍🏽 "
    "appear in chats, and prices like $1,234.56 or 7½ % are common.\n\n\tIndented lines follow.",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles.",
]


def load_tokenizers(directory: Path) -> dict:
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(directory / name) for name in FAMILIES if (directory / name).is_dir()}


def long_documents(corpus_dir: Path) -> tuple[list[str], str]:
    """Long texts, alternating between domains, and where they came from."""
    if corpus_dir.is_dir():
        from datasets import load_from_disk

        split = load_from_disk(str(corpus_dir))["test"]
        by_domain: dict[str, list[str]] = {}
        for row in split:
            by_domain.setdefault(row["domain"], []).append(row["text"])
        joined = {domain: "\n\n".join(texts) for domain, texts in sorted(by_domain.items())}
        pieces = [[text[i:i + 12000] for i in range(0, len(text) - 6000, 12000)] for text in joined.values()]
        return [p for group in itertools.zip_longest(*pieces) for p in group if p], f"{corpus_dir} (test split)"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [(stdlib / name).read_text() for name in ("argparse.py", "json/decoder.py", "textwrap.py", "inspect.py")]
    paragraphs = "\n\n".join(BUILT_IN_PARAGRAPHS * 20)
    return [*sources, paragraphs], "Python standard library sources and built-in paragraphs"


def cut_texts(documents: list[str], reference, count: int) -> list[str]:
    """Prefixes of ``documents`` that the reference tokenizer encodes in exactly TOKENS_PER_TEXT tokens."""
    texts = []
    for document in documents:
        encoding = reference(document, add_special_tokens=False, return_offsets_mapping=True)
        if len(encoding["input_ids"]) < TOKENS_PER_TEXT:
            continue
        texts.append(document[:encoding["offset_mapping"][TOKENS_PER_TEXT - 1][1]])
        if len(texts) == count:
            break
    return texts


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Token strings with the family's space / continuation marker removed, as FuseLLM compares them."""
    backend = tokenizer.backend_tokenizer
    if type(backend.model).__name__ == "WordPiece":
        marker = "##"
    elif "ByteLevel" in str(backend.decoder.__getstate__()):
        marker = "Ġ"
    else:
        marker = "▁"
    return [t.replace(marker, "") for t in tokenizer.convert_ids_to_tokens(ids)]


def fusellm_dtw(series_1: list[str], series_2: list[str]) -> list[list[int]]:
    """FuseLLM's ``dtw`` (others.py): returns, for each element of ``series_2``, the matched indices of ``series_1``."""
    matrix = np.zeros((len(series_1) + 1, len(series_2) + 1))
    matrix[0, :] = np.inf
    matrix[:, 0] = np.inf
    matrix[0, 0] = 0
    for i, vec1 in enumerate(series_1):
        for j, vec2 in enumerate(series_2):
            cost = Levenshtein.distance(vec1, vec2)
            matrix[i + 1, j + 1] = cost + min(matrix[i, j + 1], matrix[i + 1, j], matrix[i, j])
    return _backtrack(matrix[1:, 1:])


def vectorised_dtw(series_1: list[str], series_2: list[str]) -> list[list[int]]:
    """The same recurrence, costs from rapidfuzz cdist and each anti-diagonal in one numpy step."""
    cost = process.cdist(series_1, series_2, scorer=Levenshtein.distance, dtype=np.int32, workers=1)
    n, m = cost.shape
    matrix = np.full((n + 1, m + 1), np.inf)
    matrix[0, 0] = 0
    for diagonal in range(2, n + m + 1):
        i = np.arange(max(1, diagonal - m), min(n, diagonal - 1) + 1)
        j = diagonal - i
        best = np.minimum(np.minimum(matrix[i - 1, j], matrix[i, j - 1]), matrix[i - 1, j - 1])
        matrix[i, j] = cost[i - 1, j - 1] + best
    return _backtrack(matrix[1:, 1:])


def _backtrack(matrix: np.ndarray) -> list[list[int]]:
    i, j = matrix.shape[0] - 1, matrix.shape[1] - 1
    mappings = [[] for _ in range(matrix.shape[1])]
    while i > 0 or j > 0:
        mappings[j].append(i)
        option_diag = matrix[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        option_up = matrix[i - 1, j] if i > 0 else np.inf
        option_left = matrix[i, j - 1] if j > 0 else np.inf
        move = np.argmin([option_diag, option_up, option_left])
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    mappings[0].append(0)
    return [mapping[::-1] for mapping in mappings]


def dtw_shares(target_to_source, source_starts, target_starts, ours) -> dict:
    positions = len(target_starts) - 1
    one_to_one = valid = 0
    covered = True
    for t in range(positions):
        if len(target_to_source[t]) != 1:
            continue
        one_to_one += 1
        j = target_to_source[t][0]
        if j + 1 < len(source_starts) and source_starts[j + 1] >= 0 and source_starts[j + 1] == target_starts[t + 1]:
            valid += 1
            covered &= bool(ours[t] == j)
    return {"one_to_one": one_to_one, "valid": valid, "positions": positions, "covered": covered}


def best_time(function, repeats: int) -> float:
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def benchmark_pair(tokenizers: dict, source: str, target: str, encodings: dict, texts: list[str],
                   dtw_texts: int, repeats: int) -> dict:
    ours_time = ours_positions = ours_valid = ours_counted = 0.0
    aligned_per_text = []
    spelling = {name: TokenSpelling.of(tokenizers[name]) for name in (source, target)}
    starts = {}
    for index, text in enumerate(texts):
        source_encoding, target_encoding = encodings[source][index], encodings[target][index]
        arguments = (source_encoding["input_ids"], source_encoding["offset_mapping"], spelling[source],
                     target_encoding["input_ids"], target_encoding["offset_mapping"], spelling[target], text)
        ours_time += best_time(lambda: align_next_token_positions(*arguments), repeats)
        aligned = align_next_token_positions(*arguments).source
        aligned_per_text.append(aligned)
        starts[index] = [token_boundaries(encoding["input_ids"], encoding["offset_mapping"], text, spelling[name]).starts
                         for name, encoding in ((source, source_encoding), (target, target_encoding))]
        ours_positions += len(aligned)
        ours_valid += int((aligned >= 0).sum())
        ours_counted += len(aligned) - 1

    dtw_time = vectorised_time = dtw_positions = 0.0
    totals = {"one_to_one": 0, "valid": 0, "positions": 0, "covered": True}
    valid_share_on_dtw_texts = []
    for index, text in enumerate(texts[:dtw_texts]):
        source_tokens = token_strings(tokenizers[source], encodings[source][index]["input_ids"])
        target_tokens = token_strings(tokenizers[target], encodings[target][index]["input_ids"])
        start = time.perf_counter()
        target_to_source = fusellm_dtw(source_tokens, target_tokens)
        dtw_time += time.perf_counter() - start
        start = time.perf_counter()
        vectorised = vectorised_dtw(source_tokens, target_tokens)
        vectorised_time += time.perf_counter() - start
        if vectorised != target_to_source:
            raise RuntimeError(f"{source} -> {target}: the vectorised DTW disagrees with FuseLLM's")
        dtw_positions += len(target_tokens)
        shares = dtw_shares(target_to_source, *starts[index], aligned_per_text[index])
        for key in ("one_to_one", "valid", "positions"):
            totals[key] += shares[key]
        totals["covered"] &= shares["covered"]
        valid_share_on_dtw_texts.append(int((aligned_per_text[index] >= 0).sum()) / shares["positions"])

    ours_rate = ours_positions / ours_time
    dtw_rate = dtw_positions / dtw_time
    result = {
        "source": source,
        "target": target,
        "ours": {"positions_per_s": ours_rate, "valid_share": ours_valid / ours_counted,
                 "valid_share_on_dtw_texts": float(np.mean(valid_share_on_dtw_texts))},
        "dtw_fusellm": {"positions_per_s": dtw_rate,
                        "one_to_one_share": totals["one_to_one"] / totals["positions"],
                        "valid_share": totals["valid"] / totals["positions"],
                        "wrong_boundary_share": (totals["one_to_one"] - totals["valid"]) / totals["positions"]},
        "dtw_vectorised": {"positions_per_s": dtw_positions / vectorised_time},
        "speedup_vs_dtw": ours_rate / dtw_rate,
        "speedup_vs_dtw_vectorised": ours_rate / (dtw_positions / vectorised_time),
        "ours_covers_dtw_valid": totals["covered"],
    }
    result["bar_met"] = bool(result["speedup_vs_dtw"] >= BAR_SPEEDUP
                             and result["ours"]["valid_share_on_dtw_texts"] >= result["dtw_fusellm"]["valid_share"])
    return result


def benchmark_vocab_maps(tokenizers: dict) -> list[dict]:
    from fusion.vocab_map import VocabMap

    results = []
    for source, target in itertools.permutations(tokenizers, 2):
        start = time.perf_counter()
        mapping = VocabMap.build(tokenizers[source], tokenizers[target], len(tokenizers[source]))
        seconds = time.perf_counter() - start
        results.append({"source": source, "target": target, "build_s": seconds, "coverage": mapping.coverage()})
        print(f"{source:>17} -> {target:<17} vocab map {seconds:5.1f} s {mapping.coverage()}", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "alignment.json")
    parser.add_argument("--tokenizers", type=Path, default=ROOT / "assets" / "tokenizers")
    parser.add_argument("--corpus", type=Path, default=ROOT / "assets" / "corpus")
    parser.add_argument("--texts", type=int, default=8, help="texts for our alignment (speed and valid share)")
    parser.add_argument("--dtw-texts", type=int, default=2,
                        help="of those, texts also aligned by both DTWs (valid shares are compared on these)")
    parser.add_argument("--repeats", type=int, default=20, help="runs of our alignment per text (best kept)")
    parser.add_argument("--vocab-maps", action="store_true",
                        help="also time fusion.vocab_map.VocabMap.build (no cache) for every ordered pair")
    args = parser.parse_args()

    tokenizers = load_tokenizers(args.tokenizers)
    if len(tokenizers) < 2:
        note = f"fewer than two tokenizer families in {args.tokenizers}: nothing to compare"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"definitions": DEFINITIONS, "pairs": [], "note": note}, indent=2))
        print(note)
        print("bar: speedup_vs_dtw nan")
        return 0
    reference = "gpt2" if "gpt2" in tokenizers else next(iter(tokenizers))
    documents, origin = long_documents(args.corpus)
    texts = cut_texts(documents, tokenizers[reference], args.texts)
    encodings = {name: [tok(text, return_offsets_mapping=True, split_special_tokens=True) for text in texts]
                 for name, tok in tokenizers.items()}

    results = []
    for source, target in itertools.permutations(tokenizers, 2):
        result = benchmark_pair(tokenizers, source, target, encodings, texts, min(args.dtw_texts, len(texts)), args.repeats)
        results.append(result)
        print(f"{source:>17} -> {target:<17} ours {result['ours']['positions_per_s']:>11,.0f} pos/s "
              f"valid {result['ours']['valid_share_on_dtw_texts']:.3f} | DTW {result['dtw_fusellm']['positions_per_s']:>7,.0f} pos/s "
              f"1:1 {result['dtw_fusellm']['one_to_one_share']:.3f} valid {result['dtw_fusellm']['valid_share']:.3f} | "
              f"x{result['speedup_vs_dtw']:,.0f} (vectorised DTW x{result['speedup_vs_dtw_vectorised']:,.0f})", flush=True)

    vocab_maps = benchmark_vocab_maps(tokenizers) if args.vocab_maps else None
    smallest = min(r["speedup_vs_dtw"] for r in results)
    report = {
        "definitions": DEFINITIONS,
        "config": {"tokens_per_text": TOKENS_PER_TEXT, "reference_tokenizer": reference, "texts": len(texts),
                   "dtw_texts": min(args.dtw_texts, len(texts)), "repeats": args.repeats, "text_origin": origin,
                   "text_characters": [len(t) for t in texts], "families": list(tokenizers)},
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
                    "load_average": os.getloadavg(), "platform": platform.platform()},
        "pairs": results,
        "vocab_maps": vocab_maps,
        "summary": {"min_speedup_vs_dtw": smallest,
                    "min_speedup_vs_dtw_vectorised": min(r["speedup_vs_dtw_vectorised"] for r in results),
                    "min_valid_share_margin": min(r["ours"]["valid_share_on_dtw_texts"] - r["dtw_fusellm"]["valid_share"]
                                                  for r in results),
                    "bar_met": all(r["bar_met"] for r in results)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"wrote {args.out}")
    print(f"bar: speedup_vs_dtw {smallest:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
