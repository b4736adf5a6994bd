"""Source models' sparse answers: scoring texts, aligning to the target, storing them offline."""
from fusion.sources.answer import SparseSoftLabels, answer_features, from_arrow, to_arrow
from fusion.sources.scoring import SourceScorer, encode_with_offsets, next_token_topk

__all__ = [
    "SparseSoftLabels",
    "SourceScorer",
    "answer_features",
    "encode_with_offsets",
    "from_arrow",
    "next_token_topk",
    "to_arrow",
]
