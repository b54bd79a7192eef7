"""Batch-invariant mode (issue 58 item 4): which kernel backend an engine that asked for it runs, and what it refuses.

`LLM(batch_invariant=True)`, `moelink serve --batch-invariant` (SGLang's `--enable-deterministic-inference` spelled
too), or vLLM's environment variable `VLLM_BATCH_INVARIANT=1`: every rank runs the `batch_invariant` kernel backend
(kernels/batch_invariant.py: matmuls on fixed row tiles, attention over fixed key blocks in position order), so a
request's tokens and logprobs are bitwise the same whatever else is in the batch, and a decode step's logprob of a
token equals the prompt logprob a re-prefill gives it. What it does not cover yet is refused here, naming it, rather
than served with batch-dependent numbers.
"""
from __future__ import annotations

import os

from .model import ModelConfig

ENV = "VLLM_BATCH_INVARIANT"
BACKEND = "batch_invariant"
# The attention kinds whose every reduction goes through the invariant kernels (kernels/batch_invariant_kernels.py
# supported_attention_kinds, kept equal by tests/engine/test_batch_invariant_engine.py): "compressed" is
# DeepSeek-V4's CSA / HCA (kernels/batch_invariant_compressed.py), "block_sparse" MiniMax-M3's, "pooled_dsa" GLM-5.3's,
# "qsa" Qwen3.8's (kernels/batch_invariant_*.py).
ATTENTION_KINDS = frozenset({"gqa", "mla", "linear", "kda", "dsa", "compressed", "block_sparse", "pooled_dsa", "qsa"})


def from_env() -> bool:
    """vLLM's switch: VLLM_BATCH_INVARIANT=1 (any value but '' and '0')."""
    return os.environ.get(ENV, "") not in ("", "0")


def resolve_kernels(batch_invariant: bool, kernels: str, model: ModelConfig, *, tensor_parallel_size: int,
                    expert_parallel_size: int, index_cache_dtype: str = "auto") -> str:
    # expert_parallel_size: any. The all-to-alls move rows whole, each rank's experts run per expert on fixed tiles,
    # and a token's rows come back one per serving rank, summed in rank order (tests/ep/test_ep_batch_invariant.py).
    # tensor_parallel_size: any. The TP group's sums gather the partials and add them in rank order
    # (engine/tp/group.py: torch's all-reduce adds in an order the tensor's size sets); the worker asks for that when
    # the backend is this one.
    """The kernel backend name the ranks build: `kernels` unchanged when the mode is off; `batch_invariant` when it
    is on and the model and layout are ones it covers, else one ValueError naming what is not."""
    if not isinstance(batch_invariant, bool):
        raise ValueError(f"batch_invariant={batch_invariant!r} is invalid: must be True or False.")
    if not batch_invariant:
        return kernels
    if kernels not in ("auto", "reference", BACKEND):
        raise ValueError(f"kernels={kernels!r} is invalid with batch_invariant=True: the mode runs its own kernels "
                         f"({BACKEND!r}); leave kernels='auto'.")
    layers = [model.attention_for(i) for i in range(model.num_layers)]
    # DSA (an MLA layer with a lightning indexer: DeepSeek-V3.2, GLM-5) selects keys in its own sparse kernel.
    kinds = sorted({_kind(a) for a in layers} - ATTENTION_KINDS)
    if kinds:
        raise ValueError(f"batch_invariant=True is not supported for {model.architecture}: its attention kind(s) "
                         f"{', '.join(kinds)} have no batch-invariant kernels yet (supported: "
                         f"{', '.join(sorted(ATTENTION_KINDS))}).")
    if index_cache_dtype == "fp8" and any(k in ("dsa", "pooled_dsa") for k in {_kind(a) for a in layers}):
        # The fp8 index keys' dequantize-and-score has no invariant form yet (kernels/batch_invariant_kernels.py).
        raise ValueError(f"index_cache_dtype={index_cache_dtype!r} is not supported with batch_invariant=True yet: "
                         "serve index_cache_dtype='auto'.")
    # Quantized weights: any format. FP8's per-token activation scales reduce each row alone (on the mode's tiles),
    # and the INT4 / MXFP4 / NVFP4 references dequantize into the experts' per-expert path.
    return BACKEND


def _kind(attention) -> str:
    """A layer's attention kind as the mode covers it: DSA is an MLA layer with a lightning indexer (DeepSeek-V3.2,
    GLM-5), its pooled form (GLM-5.3-Flash's kpool) a kind of its own."""
    indexer = getattr(attention, "indexer", None)
    # Only an MLA layer's indexer is DSA's: QSA (Qwen3.8-Flash-Next, a GQA layer with an indexer) keeps its own kind,
    # and with it its refusal until it has invariant kernels.
    if indexer is None or attention.kind != "mla":
        return attention.kind
    return "pooled_dsa" if getattr(indexer, "kpool", 1) > 1 else "dsa"
