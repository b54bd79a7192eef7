"""Hyper-connections as config (issue 45; DeepSeek-V4's manifold-constrained hyper-connections, engine/models/
deepseek_v4/ reads them from its config.json): `hc_mult` residual streams in place of one. Pure data: no model code.
"""
from __future__ import annotations

from dataclasses import dataclass

from .compressed_attention import positive_int
from .layer_configs import unsupported

# The most each may be, checked as config.json is read (engine/config/compressed_attention.py's ATTENTION_BOUNDS say
# why): the largest published value (DeepSeek-V4-Flash / V4-Pro) times a margin, far below what a typo asks for.
HC_BOUNDS = {
    "hc_mult": 64,  # published 4: residual streams, each a hidden_size row per token; the mixing matrix is hc_mult^2
    "hc_sinkhorn_iters": 1024,  # published 20: Sinkhorn passes run for every token at every block, every step
}


@dataclass(frozen=True)
class HyperConnectionConfig:
    """Manifold-constrained hyper-connections: `hc_mult` residual streams, mixed by a Sinkhorn-normalised matrix
    (`sinkhorn_iters` normalisations, floor `eps`) around every attention and MLP block; a hyper-head collapses them
    before the final norm.

    `comb` False: Hunyuan Hy4's independent hyper-connections (its iHC): no mixing matrix (no Sinkhorn:
    sinkhorn_iters 0), each stream keeps itself and adds its `post` share of the block's output; `post_mult` is the
    post gate's scale (DeepSeek-V4's fixed 2, Hy4's hc_magnitude), `post_eps` adds `eps` to it (Hy4 does)."""

    hc_mult: int
    sinkhorn_iters: int
    eps: float
    comb: bool = True
    post_mult: float = 2.0
    post_eps: bool = False

    def __post_init__(self) -> None:
        positive_int("hc_mult", self.hc_mult, HC_BOUNDS)
        if self.comb:
            positive_int("hc_sinkhorn_iters", self.sinkhorn_iters, HC_BOUNDS)
        elif self.sinkhorn_iters != 0:
            raise unsupported("hc_sinkhorn_iters", self.sinkhorn_iters, (0,), " without a mixing matrix (comb False)")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise unsupported("hc_eps", self.eps, "a number > 0")
        if isinstance(self.post_mult, bool) or not isinstance(self.post_mult, (int, float)) or not self.post_mult > 0:
            raise unsupported("hc_magnitude", self.post_mult, "a number > 0")
        for name in ("comb", "post_eps"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"HyperConnectionConfig {name}={getattr(self, name)!r} is invalid: must be True or "
                                 "False.")

    @property
    def mix_rows(self) -> int:
        """Rows of a block's mixing projection: pre and post per stream, and the n x n matrix where there is one."""
        n = self.hc_mult
        return (2 + n) * n if self.comb else 2 * n

    @staticmethod
    def check_speculative(spec, arch: str) -> None:
        """Speculative decoding over hyper-connections (engine/config/engine_args.py asks): drafts from n-gram lookup
        or the checkpoint's MTP layer are verified as on any model; EAGLE-3 heads are trained on one residual stream
        and a model with hyper-connections keeps `hc_mult`."""
        if spec is not None and spec.runs_eagle3:
            raise ValueError(f"speculative_config.method={spec.method!r} is not supported for {arch}: an EAGLE-3 head "
                             "reads one residual stream and this model keeps several (hyper-connections); use method 'mtp' "
                             "(the checkpoint's own MTP layer) or 'ngram'.")


__all__ = ["HC_BOUNDS", "HyperConnectionConfig"]
