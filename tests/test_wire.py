"""The exchange-group message format: what one side packs, the other unpacks unchanged."""
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusion.sources.answer import SparseSoftLabels
from fusion.sources.wire import HEADER_SIZE, Header, Kind, answer_tensors, decode_texts, encode_texts


@given(st.lists(st.text(max_size=40), max_size=6))
def test_texts_survive_the_byte_encoding(texts):
    lengths, data = encode_texts(texts)
    assert lengths.dtype == torch.int64 and data.dtype == torch.uint8
    assert int(lengths.sum()) == data.numel() == sum(len(text.encode("utf-8")) for text in texts)
    assert decode_texts(lengths, data) == texts


def test_header_round_trip_and_fixed_size():
    header = Header(Kind.ANSWER, step=12, request_id=345, rows=3, length=48, size=10, compute_us=987654)
    tensor = header.tensor()
    assert tensor.shape == (HEADER_SIZE,) and tensor.dtype == torch.int64
    assert Header.from_tensor(tensor) == header
    assert Header.from_tensor(Header(Kind.STOP).tensor()).kind is Kind.STOP


def test_answer_tensors_carry_every_field():
    answer = SparseSoftLabels.empty(2, 5, 3, torch.float16)
    answer.indices[1, 2] = torch.tensor([7, 8, 9], dtype=torch.int32)
    answer.logprobs[1, 2] = torch.tensor([-0.5, -1.5, -2.5], dtype=torch.float16)
    answer.valid[1, 2] = True
    answer.nll_per_token[:] = torch.tensor([1.25, 2.5])
    answer.nll_per_byte[:] = torch.tensor([0.5, 0.75])
    indices, logprobs, valid, nll = answer_tensors(answer)
    # What the trainer rebuilds from the received buffers.
    received = SparseSoftLabels(indices, logprobs, valid.bool(), nll[0], nll[1])
    assert torch.equal(received.indices, answer.indices) and torch.equal(received.valid, answer.valid)
    assert torch.equal(received.logprobs, answer.logprobs.float())
    assert received.nll_per_token.tolist() == [1.25, 2.5] and received.nll_per_byte.tolist() == [0.5, 0.75]
