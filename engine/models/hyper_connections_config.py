"""Hyper-connections as config (issue 45; DeepSeek-V4's manifold-constrained hyper-connections, engine/models/
deepseek_v4/ reads them from its config.json): `hc_mult` residual streams in place of one. Pure data: no model code.

Two ways of mixing the streams (`mixing`):
- "sinkhorn" (DeepSeek-V4): per block a learned projection gives pre / post mixes and a Sinkhorn-normalised
  stream-to-stream matrix; `sinkhorn_iters`, `eps` apply.
- "gated" (Qwen3.8-Flash-Next, engine/models/qwen4_exp/): a low-rank mixer (`lowrank`) gives a sigmoid weight per
  stream and channel that collapses the normed streams into the block input (their mean), a sigmoid gate per stream
  spreads the block's output back, and the streams are never mixed with each other (the stream-to-stream matrix is
  the identity).
"""
from __future__ import annotations

from dataclasses import dataclass

from .compressed_attention_config import positive_int
from ..config.refusals import unsupported

# The most each may be, checked as config.json is read (engine/models/compressed_attention_config.py's ATTENTION_BOUNDS say
# why): the largest published value (DeepSeek-V4-Flash / V4-Pro) times a margin, far below what a typo asks for.
HC_BOUNDS = {
    "hc_mult": 64,
    "hc_count": 64,  # the gated form's name for hc_mult (published 4)  # published 4: residual streams, each a hidden_size row per token; the mixing matrix is hc_mult^2
    "hc_sinkhorn_iters": 1024,  # published 20: Sinkhorn passes run for every token at every block, every step
    "hc_lowrank": 1 << 14,  # published 320: the gated mixer's rank (weights hc_mult * hidden * rank per block)
}
HC_MIXINGS = ("sinkhorn", "gated")


@dataclass(frozen=True)
class HyperConnectionConfig:
    """Hyper-connections: `hc_mult` residual streams around every attention and MLP block, mixed as `mixing` says
    (module docstring; "sinkhorn": `sinkhorn_iters` normalisations, floor `eps`); a head collapses them before the
    LM head.

    `comb` False (with "sinkhorn"'s projections): Hunyuan Hy4's independent hyper-connections (its iHC): no mixing
    matrix (no Sinkhorn: sinkhorn_iters 0), each stream keeps itself and adds its `post` share of the block's
    output; `post_mult` is the post gate's scale (DeepSeek-V4's fixed 2, Hy4's hc_magnitude), `post_eps` adds `eps`
    to it (Hy4 does)."""

    hc_mult: int
    sinkhorn_iters: int
    eps: float
    mixing: str = "sinkhorn"  # module docstring
    lowrank: int = 0  # "gated": the mixer's rank (config.json hc_lowrank)
    comb: bool = True
    post_mult: float = 2.0
    post_eps: bool = False

    def __post_init__(self) -> None:
        if self.mixing not in HC_MIXINGS:
            raise ValueError(f"HyperConnectionConfig mixing={self.mixing!r} is invalid: allowed: "
                             f"{', '.join(HC_MIXINGS)}.")
        positive_int("hc_count" if self.mixing == "gated" else "hc_mult", self.hc_mult, HC_BOUNDS)
        if self.mixing == "gated":
            if self.hc_mult < 2:
                raise unsupported("hc_count", self.hc_mult, "an integer >= 2 (residual streams)")
            positive_int("hc_lowrank", self.lowrank, HC_BOUNDS)
            if not self.comb or self.post_eps or self.post_mult != 2.0:
                raise ValueError("HyperConnectionConfig comb / post_mult / post_eps are the \"sinkhorn\" form's: leave "
                                 "them at their defaults with mixing \"gated\".")
            return
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

    def check_speculative(self, spec, arch: str) -> None:
        """Speculative decoding over hyper-connections (engine/config/engine_args.py asks): drafts from n-gram lookup
        or the checkpoint's MTP layer are verified as on any model; EAGLE-3 heads are trained on one residual stream
        and a model with hyper-connections keeps `hc_mult`."""
        if spec is not None and spec.runs_eagle3:
            raise ValueError(f"speculative_config.method={spec.method!r} is not supported for {arch}: an EAGLE-3 head "
                             "reads one residual stream and this model keeps several (hyper-connections); use method 'mtp' "
                             "(the checkpoint's own MTP layer) or 'ngram'.")


__all__ = ["HC_BOUNDS", "HyperConnectionConfig"]
