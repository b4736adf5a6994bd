"""Corpus text is text: special-token strings inside documents never become control tokens.

Checked on every side that tokenizes corpus text: the target collator, chunking, and the encoding
the source scorer and the target offsets share (fusion.sources.scoring.encode_with_offsets).
"""
from __future__ import annotations

from conftest import REAL_FAMILIES

from fusion.assets.local_models import train_bpe_tokenizer
from fusion.data import TextBatchCollator, chunk_documents
from fusion.sources.scoring import encode_with_offsets

DOCUMENT = "Before <s> and </s>, then <|endoftext|> <|im_end|> <bos> <eos> [CLS] [SEP] <unk> <pad> after."


def _control_ids(tokenizer) -> set[int]:
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    return (set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}) - {tokenizer.unk_token_id}


def test_scorer_encoding_spells_special_strings_as_text(real_tokenizers):
    for name in REAL_FAMILIES:
        tok = real_tokenizers[name]
        ids, offsets, special = encode_with_offsets(tok, [DOCUMENT])
        # Only the tokens the tokenizer adds around the text (zero-width) are control tokens.
        inside = [i for i, (start, end) in zip(ids[0], offsets[0]) if end > start]
        assert not set(inside) & _control_ids(tok), name
        covered = "".join(DOCUMENT[start:end] for start, end in offsets[0] if end > start)
        assert "<|endoftext|>" in covered or name == "minilm-wordpiece", name


def test_collator_and_chunking_spell_special_strings_as_text():
    tok = train_bpe_tokenizer([DOCUMENT.replace("<", "( ").replace(">", " )")] * 5, 300)
    batch = TextBatchCollator(tok, max_length=256)([{"text": DOCUMENT, "domain": "d"}])
    ids = batch["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id  # the BOS the tokenizer adds
    assert not set(ids[1:]) & _control_ids(tok)
    plain = len(tok(DOCUMENT, split_special_tokens=True)["input_ids"])
    assert len(ids) == plain > len(tok(DOCUMENT)["input_ids"])
    # Chunking counts the same tokens: a budget of exactly that many keeps the document whole.
    chunks, _, _ = chunk_documents([DOCUMENT], ["d"], [tok], plain)
    assert chunks == [DOCUMENT]
