"""Pallas (Triton) kernels for sparse_jax: plain arrays in, arrays out.

One file per kernel, each with its pallas_call launcher, a public jitted function with a
``backend="pallas" | "reference"`` switch, and a plain jax.numpy ``*_reference``:

* :func:`paged_decode_attention`: paged / block-sparse GQA decode attention (split-K).
* :func:`compact_pages`: in-place compaction of paged pools after KV selection.
* :func:`rocket_block_scores`: RocketKV KT-cache block scoring for the decode token.
* :func:`rocket_decode_attention`: RocketKV's scoring, top-k block selection and sparse
  decode attention in two launches.

Shapes shared by tests and benchmarks live in :mod:`pallas_kernels.named_shapes`; jax
version differences in :mod:`pallas_kernels._compat`.
"""

from pallas_kernels.compaction import compact_pages, compact_pages_reference
from pallas_kernels.paged_decode import (
    paged_decode_attention,
    paged_decode_attention_reference,
)
from pallas_kernels.rocket_decode import (
    rocket_decode_attention,
    rocket_decode_attention_reference,
)
from pallas_kernels.rocket_score import (
    rocket_block_scores,
    rocket_block_scores_reference,
)

__all__ = [
    "compact_pages",
    "compact_pages_reference",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "rocket_block_scores",
    "rocket_decode_attention",
    "rocket_decode_attention_reference",
    "rocket_block_scores_reference",
]
