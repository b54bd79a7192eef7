"""Placeholder replaced below."""
from .block_sparse import reference_block_sparse_attention as triton_block_sparse_attention  # noqa: F401
