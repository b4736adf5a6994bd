"""Soft-label fidelity of the real sources on the demo's target, per source and domain, old code vs new.

For each source in ``assets/models`` (SmolLM2-135M, Gemma-3-270M) and each domain of the corpus's
validation split (``assets/corpus``), the first ``--texts`` documents are cut to at most
``--max-length`` target tokens (at a target token boundary) and scored by the source with
``fusion.sources.scoring.SourceScorer`` (top-k 10). Over the target positions that predict a text
token (``t < L - 1``, next token not special) it reports:

* ``coverage``: share of those positions with a label (``valid``);
* ``kept_mass``: mean over labelled positions of the probability mass of the candidates kept;
* ``gold_prob``: mean over labelled positions of the label's probability on the true next target
  token (the candidates mapped to it), as a share of the label's kept mass;
* ``top1_agreement``: share of labelled positions whose most probable candidate is the true next token;
* ``ms_per_1k_tokens``: wall time of the scorer minus its forward pass and top-k, per 1,000 target
  tokens: alignment + projection;
* ``wrong_label_rate``: share of labelled positions whose label is wrong by an independent reference.
  The reference (``tests/alignment_reference.py``) never reads offsets: it spells every id of both
  encodings from its token string and walks the spellings along the text. For target position ``t``
  whose next token starts, by the reference, at character ``c`` with no virtual space, it expects the
  label from source position ``j`` when source token ``j + 1`` starts at ``c`` (at the space shift of
  the two tokens' virtual spaces; a virtual target token is expected only so), else, inside source
  token ``m`` (the last token starting before ``c``, ``m >= 1``, no virtual space, whose spelling
  begins with ``text[start_m:c]`` and is longer), from position ``m - 1`` conditioned on
  ``text[start_m:c]``; otherwise no label. A label is wrong when the scorer's
  ``fusion.alignment.LabelPlan`` says it came from another source position, another space shift or
  another seen text, or the reference expects none there. (Measured only for code whose scorer
  exposes ``plans``; ``null`` otherwise.)
* ``uncovered``: the unlabelled positions by cause, as shares of all positions: the plan's reason
  (``fusion.alignment.PLAN_KINDS``), or ``aligned_all_dropped`` / ``inside_all_dropped`` where a
  source distribution was found but the vocabulary map dropped every candidate.

``--old [COMMIT]`` also runs the code of ``COMMIT`` (default ``47dc939``: edit-distance vocabulary map,
offsets-only alignment), extracted with ``git archive`` into a temporary folder and run in a
subprocess, on the same texts. The output ends with ``bar:`` lines: ``max_wrong_label_rate`` (new code,
over sources and domains), with ``--old`` ``min_gold_prob_ratio`` (new over old gold_prob, lowest
over sources and domains), and last ``bar: min_coverage <x>``, the lowest new coverage over sources
and domains; the exit status is 0 whether or not a bar is met.

    python benchmarks/label_fidelity.py [--texts 8] [--max-length 128] [--old [COMMIT]] [--out benchmarks/results/label_fidelity.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "47dc939"
SOURCES = ("smollm2-135m", "gemma3-270m")
# (family, dummy-prefix rule) of each model folder's tokenizer, for the reference (tests/alignment_reference.py).
REFERENCE_RULES = {"smollm2-135m": ("byte_level", None), "gemma3-270m": ("sentencepiece", None),
                   "target": ("byte_level", None)}


def texts_per_domain(corpus_dir: Path, target_tokenizer, count: int, max_length: int) -> dict[str, list[str]]:
    import datasets

    split = datasets.load_from_disk(str(corpus_dir))["validation"]
    result: dict[str, list[str]] = {}
    for text, domain in zip(split["text"], split["domain"]):
        chosen = result.setdefault(domain, [])
        if len(chosen) >= count:
            continue
        encoding = target_tokenizer(text, add_special_tokens=True, return_offsets_mapping=True,
                                    split_special_tokens=True)
        ends = [end for start, end in encoding["offset_mapping"] if end > start]
        if len(ends) < 8:
            continue
        chosen.append(text[: ends[min(len(ends), max_length - 2) - 1]])
    return result


def _timed(function, seconds: list[float]):
    """``function`` that adds its wall time to ``seconds[0]``."""
    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = function(*args, **kwargs)
        seconds[0] += time.perf_counter() - start
        return out
    return timed


def expected_plan(source_tokenizer, source_rule, source_ids, target_tokenizer, target_ids, text: str) -> list:
    """Per target position, the reference's source context: ``("aligned", j, shift)``, ``("inside", m - 1,
    start_m)`` or None (module docstring, ``wrong_label_rate``)."""
    from alignment_reference import reference_alignment, reference_boundaries, reference_spell

    source = reference_boundaries(source_tokenizer, *source_rule, source_ids, text)
    target = reference_boundaries(target_tokenizer, *REFERENCE_RULES["target"], target_ids, text)
    aligned = reference_alignment(source, target, text)
    expected = []
    for t in range(len(target_ids)):
        c, virtual = target[t + 1] if t + 1 < len(target) else (None, False)
        if aligned[t][0] >= 0:
            expected.append(("aligned", aligned[t][0], aligned[t][1]))
            continue
        before = [k for k, (start, _) in enumerate(source) if start is not None and c is not None and start < c]
        m = before[-1] if before else -1
        if c is None or virtual or m < 1 or source[m][1]:
            expected.append(None)
            continue
        seen = text[source[m][0]:c].encode("utf-8", "surrogatepass")
        spelled = reference_spell(source_tokenizer, source_rule[0], int(source_ids[m]))[0] or b""
        expected.append(("inside", m - 1, source[m][0]) if spelled.startswith(seen) and len(spelled) > len(seen)
                        else None)
    return expected


def plan_context(plan, t: int, kinds: tuple) -> tuple | None:
    """The scorer's source context of target position ``t`` in the form of ``expected_plan``."""
    kind = kinds[plan.kind[t]]
    if kind == "aligned":
        return ("aligned", int(plan.source[t]), int(plan.space_shift[t]))
    if kind == "inside":
        return ("inside", int(plan.source[t]), int(plan.seen_from[t]))
    return None


def measure(texts_by_domain: dict[str, list[str]], models_dir: Path, top_k: int, batch: int) -> dict:
    """Metrics of the ``fusion`` package importable now (new code, or old code on sys.path)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fusion.alignment as alignment
    import fusion.sources.scoring as scoring
    from fusion.sources.scoring import SourceScorer, encode_with_offsets
    from fusion.vocab_map import VocabMap

    sys.path.insert(0, str(ROOT / "tests"))  # the brute-force reference of tests/alignment_reference.py
    kinds = getattr(alignment, "PLAN_KINDS", None)

    torch.set_num_threads(2)
    target_tokenizer = AutoTokenizer.from_pretrained(models_dir / "target")
    results = {}
    for source in SOURCES:
        tokenizer = AutoTokenizer.from_pretrained(models_dir / source)
        model = AutoModelForCausalLM.from_pretrained(models_dir / source, torch_dtype=torch.float32).eval()
        vocab_map = VocabMap.build(tokenizer, target_tokenizer, model.config.vocab_size)
        scorer = SourceScorer(model, tokenizer, target_tokenizer, vocab_map, top_k=top_k, dtype=torch.float32)
        scorer.score(next(iter(texts_by_domain.values()))[:1])  # one-off set-up (spelling tables) left out of timing
        # Time spent in the forward pass and the top-k, subtracted to leave alignment + projection.
        forward_time = [0.0]
        topk = scoring.next_token_topk
        scoring.next_token_topk = _timed(topk, forward_time)
        model.forward = _timed(model.forward, forward_time)
        per_domain = {}
        has_plans = kinds is not None and hasattr(scorer, "plans")
        for domain, texts in texts_by_domain.items():
            counted = labelled = agree = wrong = 0
            uncovered: dict[str, int] = {}
            kept_mass = gold_prob = 0.0
            total_time = 0.0
            target_tokens = 0
            forward_time[0] = 0.0
            for begin in range(0, len(texts), batch):
                chunk = texts[begin : begin + batch]
                ids, _, special = encode_with_offsets(target_tokenizer, chunk)
                start = time.perf_counter()
                answer = scorer.score(chunk)
                total_time += time.perf_counter() - start
                probs = answer.logprobs.float().exp()
                plans = scorer.plans(chunk) if has_plans else None
                source_ids = encode_with_offsets(tokenizer, chunk)[0] if has_plans else None
                for row, (row_ids, row_special) in enumerate(zip(ids, special)):
                    target_tokens += len(row_ids)
                    expected = (expected_plan(tokenizer, REFERENCE_RULES[source], source_ids[row], target_tokenizer,
                                              row_ids, chunk[row]) if has_plans else None)
                    for t in range(len(row_ids) - 1):
                        if row_special[t + 1]:
                            continue
                        counted += 1
                        if not answer.valid[row, t]:
                            if has_plans:
                                kind = kinds[plans[row].kind[t]]
                                cause = f"{kind}_all_dropped" if kind in ("aligned", "inside") else kind
                                uncovered[cause] = uncovered.get(cause, 0) + 1
                            continue
                        labelled += 1
                        if has_plans:
                            got = plan_context(plans[row], t, kinds)
                            wrong += int(expected[t] is None or got != expected[t])
                        p = probs[row, t]
                        kept_mass += float(p.sum())
                        on_gold = answer.indices[row, t] == row_ids[t + 1]
                        gold_prob += float(p[on_gold].sum()) / max(float(p.sum()), 1e-12)
                        agree += int(answer.indices[row, t][int(p.argmax())] == row_ids[t + 1])
            per_domain[domain] = {
                "positions": counted,
                "coverage": labelled / counted if counted else float("nan"),
                "kept_mass": kept_mass / labelled if labelled else float("nan"),
                "gold_prob": gold_prob / labelled if labelled else float("nan"),
                "top1_agreement": agree / labelled if labelled else float("nan"),
                "ms_per_1k_tokens": 1000 * (total_time - forward_time[0]) / target_tokens * 1000,
                "wrong_label_rate": (wrong / labelled if labelled else float("nan")) if has_plans else None,
                "uncovered": {cause: n / counted for cause, n in sorted(uncovered.items())} if has_plans else None,
            }
            d = per_domain[domain]
            print(f"{source:>13} {domain:>12} coverage {d['coverage']:.3f} gold_prob {d['gold_prob']:.3f} "
                  f"top1 {d['top1_agreement']:.3f} kept {d['kept_mass']:.3f} {d['ms_per_1k_tokens']:.0f} ms/1k"
                  + (f" wrong {d['wrong_label_rate']:.4f} uncovered "
                     + " ".join(f"{c}={v:.3f}" for c, v in d["uncovered"].items()) if has_plans else ""),
                  file=sys.stderr, flush=True)
        scoring.next_token_topk = topk
        results[source] = {"coverage": vocab_map.coverage(), "domains": per_domain}
        del model
    return results


def run_old(texts_by_domain: dict, args) -> dict:
    """The same measurement with the package of OLD_COMMIT, in a subprocess."""
    with tempfile.TemporaryDirectory() as folder:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.old, "fusion"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
        texts_file = Path(folder) / "texts.json"
        texts_file.write_text(json.dumps(texts_by_domain))
        out = subprocess.run(
            [sys.executable, __file__, "--measure-only", str(texts_file), "--package-root", folder,
             "--models", str(args.models), "--top-k", str(args.top_k), "--batch", str(args.batch)],
            check=True, capture_output=True, text=True)
        sys.stderr.write(out.stderr)
        return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=8, help="validation documents per domain")
    parser.add_argument("--max-length", type=int, default=128, help="target tokens per text")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--old", nargs="?", const=OLD_COMMIT, metavar="COMMIT",
                        help=f"also measure the code of COMMIT (default {OLD_COMMIT})")
    parser.add_argument("--models", type=Path, default=ROOT / "assets" / "models")
    parser.add_argument("--corpus", type=Path, default=ROOT / "assets" / "corpus")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "label_fidelity.json")
    parser.add_argument("--measure-only", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--package-root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure_only is not None:
        sys.path.insert(0, str(args.package_root))
        print(json.dumps(measure(json.loads(args.measure_only.read_text()), args.models, args.top_k, args.batch)))
        return 0

    sys.path.insert(0, str(ROOT))
    missing = [name for name in (*SOURCES, "target") if not (args.models / name / "config.json").exists()]
    if missing or not (args.corpus / "dataset_dict.json").exists():
        print(f"missing assets ({missing or 'corpus'}); run `make assets` first")
        print("bar: min_coverage nan")
        return 0
    from transformers import AutoTokenizer

    target_tokenizer = AutoTokenizer.from_pretrained(args.models / "target")
    texts_by_domain = texts_per_domain(args.corpus, target_tokenizer, args.texts, args.max_length)
    new = measure(texts_by_domain, args.models, args.top_k, args.batch)
    old = run_old(texts_by_domain, args) if args.old else None
    pairs = [(source, domain) for source in new for domain in new[source]["domains"]]
    smallest = min(new[source]["domains"][domain]["coverage"] for source, domain in pairs)
    most_wrong = max(new[source]["domains"][domain]["wrong_label_rate"] for source, domain in pairs)
    summary = {"min_coverage": smallest, "max_wrong_label_rate": most_wrong}
    if old is not None:
        summary["min_gold_prob_ratio"] = min(
            new[source]["domains"][domain]["gold_prob"] / old[source]["domains"][domain]["gold_prob"]
            for source, domain in pairs)
    report = {"config": {"texts_per_domain": args.texts, "max_length": args.max_length, "top_k": args.top_k,
                         "old_commit": args.old},
              "new": new, "old": old, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    print(f"bar: max_wrong_label_rate {most_wrong:.4f}")
    if old is not None:
        print(f"bar: min_gold_prob_ratio {summary['min_gold_prob_ratio']:.3f}")
    print(f"bar: min_coverage {smallest:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
