"""The MXFP4 fused MoE (gpt-oss) for tune_moe (`tune_moe --dtype mxfp4`): what differs from the bf16 tuning.

    python -m moelink.benchmarks.tune_moe --dtype mxfp4 [--shapes gpt-oss-20b,gpt-oss-120b] [--tokens 1024,4096]
        [--budget-s 400] [--out-dir DIR] [--merge-from DIR] [--cpu-smoke]

tune_moe's search, budget per bucket, confirmation and merge run unchanged with this module's `Mxfp4Kind`:
- Inputs: moe_mxfp4's random MXFP4 layer (published layout, gpt-oss's exponent spread, bf16 biases, swiglu_oai)
  once per shape; x in bf16.
- The paths: a bucket's config picks the per-tile path (kernels/triton_moe_mxfp4.py, blocks as the config says) or,
  with DEQUANT, dequantize-once then the float sorted path, which runs the float config the engine gives it
  (`get_moe_config`: the blocks of a DEQUANT bucket are not what it launches, so the search times it once). The
  seeds are the config moelink uses now (a tuned file's, else mxfp4_moe_default.json's) and the same with DEQUANT
  flipped, and the per-tile path at the 128-row blocks the compile report picked (not where the seed's TINY entry
  covers the batch: the GEMVs run there whatever the rest says): whether a bucket dequantizes first is decided by
  timing both, then the block axes move from the faster.
- Candidates: the bf16 space's block axes; FUSED_GATE_UP, PERSISTENT, TMA and WARP_SPECIALIZE are not applied to
  MXFP4 (`Mxfp4Format.gemms`) and BLOCK_K is at least a scale group (`mxfp4_config`): a candidate is mapped to what
  launches and one that launches the same as a config already timed is not timed again. Pruned as bf16 is
  (tune_space.feasible at 2-byte tiles: the decoded weight tile is bf16 in shared memory). The decode GEMVs' TINY
  entry rides along as the seed has it (not an axis here).
- Correctness: against reference_fused_moe_mxfp4 in float32 on the same weights, within MXFP4_TOL.
- Record: `mxfp4,E={E},N={I},device_name={GPU}.json` (mxfp4_config_table reads it first), each bucket's seed and
  tuned ms, and bf16_ms: the bf16 fused MoE on the dequantized weights with the bf16 config moelink uses now; a
  `RATIO` line prints mxfp4 / bf16 per bucket (issue 80's MXFP4 row: >= 1.0x at every token count). A new file also
  holds every TOKENS bucket this run does not tune, at the config used until now (TINY and DEQUANT included).
`--cpu-smoke --dtype mxfp4`: MXFP4_SMOKE_SHAPES in the interpreter over MXFP4_SMOKE_SPACE, into a temporary directory.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from .moe_kernels import make_inputs
from .tune_space import SPACES, feasible
from .tune_timing import time_call, time_config

MXFP4_TOL = 1e-2  # the same dequantized weights on both sides: accumulation order only (moe_mxfp4 checks at 1e-2)
MXFP4_SHAPES = {"gpt-oss-120b": (128, 4, 2880, 2880), "gpt-oss-20b": (32, 4, 2880, 2880)}  # = moe_mxfp4.SHAPES
MXFP4_SMOKE_SHAPES = {"smoke-mxfp4": (8, 2, 64, 64)}  # (E, K, D, I): two scale groups along each reduction dim
# Interpreter: BLOCK_N only (32 and 64 over a 64-wide GEMM), one confirmation round.
MXFP4_SMOKE_SPACE = dict(SPACES["smoke"], BLOCK_SIZE_M=(16,), BLOCK_SIZE_N=(32, 64))
_UNAPPLIED = dict(FUSED_GATE_UP=False, PERSISTENT=0, TMA=False, WARP_SPECIALIZE=False)


def _act():
    from moelink.kernels.moe import MoEActivation

    return MoEActivation("swiglu_oai", alpha=1.702, limit=7.0)


def launched(cfg):
    """`cfg` as triton_fused_moe_mxfp4 launches it: BLOCK_K at least 32, the schedule keys off; a DEQUANT config's
    blocks replaced by mxfp4_moe_default.json's first DEQUANT bucket's (they are not what runs: the float config
    does), so every DEQUANT candidate is one launch."""
    from moelink.kernels.moe_config import committed_config
    from moelink.kernels.triton_moe_mxfp4 import mxfp4_config

    fit = mxfp4_config(cfg)  # (its blocks: mxfp4_config builds a config without TINY and DEQUANT)
    cfg = replace(cfg, up=replace(fit.up, **_UNAPPLIED), down=replace(fit.down, **_UNAPPLIED))
    if cfg.dequant:
        base = next(c for _, c in committed_config("mxfp4_moe_default.json")[1] if c.dequant)
        cfg = replace(base, tiny=cfg.tiny)
    return cfg


def time_config_mxfp4(cfg, sets, timer, iters, want=None) -> float:
    """tune_moe.time_config for the MXFP4 fused MoE: sets of (x, w13q, w13s, w2q, w2s, b13, b2, topk weights, ids).
    A DEQUANT config runs the dequantize-once path as the engine does (the float config its own)."""
    from moelink.kernels.triton_moe_mxfp4 import triton_fused_moe_mxfp4

    act = _act()
    x, tw = sets[0][0], sets[0][7]
    # (as the engine: a TINY entry covering the batch runs the GEMVs, DEQUANT or not; a DEQUANT batch, the float
    # config of the float path, which the engine never takes from the MXFP4 table)
    dequant = cfg.dequant and not cfg.uses_tiny(x.shape[0] * tw.shape[1])
    kw = dict(path="dequant") if dequant else dict(config=cfg)
    fn = lambda x, w13q, w13s, w2q, w2s, b13, b2, tw, ti: triton_fused_moe_mxfp4(  # noqa: E731
        x, w13q, w13s, w2q, w2s, tw, ti, b13_EF=b13, b2_ED=b2, activation=act, **kw)
    return time_call(fn, cfg, sets, timer, iters, want, MXFP4_TOL)


class Mxfp4Kind:
    """tune_moe.Bf16Kind's interface for the MXFP4 fused MoE (module docstring)."""

    tiny = False  # (the GEMVs' TINY entry is the seed's: their blocks are not an axis of this search)

    def __init__(self):
        self._layer, self._bf16_sets = None, None

    def _weights(self, shape, device):
        """(w13q, w13s, w2q, w2s, b13, b2, w13 bf16, w2 bf16) of this shape, made once."""
        from moelink.kernels.mxfp4 import mxfp4_dequantize

        from .moe_mxfp4 import make_layer

        if self._layer is None or self._layer[0] != shape:
            self._layer = None  # (the last shape's freed first)
            E, K, D, I = shape
            L = make_layer(E, D, I, device, torch.Generator(device=device).manual_seed(0))
            ws = [mxfp4_dequantize(L[q], L[s], torch.bfloat16) for q, s in (("w13q", "w13s"), ("w2q", "w2s"))]
            self._layer = (shape, L["w13q"], L["w13s"], L["w2q"], L["w2s"], L["b13"], L["b2"], *ws)
        return self._layer[1:]

    def inputs(self, shape, T, dtype, device, gen, n_sets):
        from moelink.kernels.mxfp4 import reference_fused_moe_mxfp4

        E, K, D, I = shape
        w13q, w13s, w2q, w2s, b13, b2, w13, w2 = self._weights(shape, device)
        self._bf16_sets = make_inputs(E, K, D, I, T, torch.bfloat16, device, gen, n_sets, weights=(w13, w2))
        sets = [(x, w13q, w13s, w2q, w2s, b13, b2, tw, ti) for x, _, _, tw, ti in self._bf16_sets]
        x, tw, ti = sets[0][0], sets[0][7], sets[0][8]
        want = reference_fused_moe_mxfp4(x.float(), w13q, w13s, w2q, w2s, tw, ti, b13_EF=b13.float(),
                                         b2_ED=b2.float(), activation=_act())
        return sets, want.float()

    def time(self, cfg, sets, timer, iters, want=None) -> float:
        return time_config_mxfp4(cfg, sets, timer, iters, want)

    def seeds(self, shape, T, device):
        """[(label, config as launched)], duplicates removed: what moelink uses now; unless its TINY entry covers the
        batch (then nothing else runs), also the other of per-tile / dequantize-once, and the per-tile path at the
        DEQUANT buckets' 128-row blocks (the compile report's pick: docs/kernels.md, MXFP4)."""
        from moelink.kernels.moe_config import _pick, committed_config, device_name
        from moelink.kernels.triton_moe_mxfp4 import mxfp4_config_table

        E, K, D, I = shape
        cur = _pick(*mxfp4_config_table(E, I, device_name(device)), T, K, E)
        out = [("current", launched(cur))]
        if not cur.uses_tiny(T * K):
            rows128 = next(c for _, c in committed_config("mxfp4_moe_default.json")[1] if c.dequant)
            out += [("DEQUANT flipped", launched(replace(cur, dequant=not cur.dequant))),
                    ("per-tile 128-row blocks", launched(replace(rows128, tiny=cur.tiny, dequant=False)))]
        return [o for i, o in enumerate(out) if o[1] not in [p[1] for p in out[:i]]]

    def launched(self, cfg):
        return launched(cfg)

    def feasible(self, cfg, shape, dtype):
        E, K, D, I = shape
        return None if cfg.dequant else feasible(launched(cfg), D, I, 2, K)

    def compare(self, shape, T, sets, timer, iters) -> dict:
        """bf16_ms: the bf16 fused MoE on the dequantized weights with the bf16 config moelink uses now."""
        from moelink.kernels.moe_config import get_moe_config

        E, K, D, I = shape
        t = time_config(get_moe_config(E, I, T, K, sets[0][0].device), self._bf16_sets, timer, iters)
        return dict(bf16_ms=round(t * 1e3, 4)) if math.isfinite(t) else {}

    def shapes(self, smoke: bool) -> dict:
        return MXFP4_SMOKE_SHAPES if smoke else MXFP4_SHAPES

    def space(self, name: str) -> dict:
        return MXFP4_SMOKE_SPACE if name == "smoke" else SPACES[name]

    def file_name(self, E: int, I: int, device) -> str:
        from moelink.kernels.moe_config import device_name
        from moelink.kernels.triton_moe_mxfp4 import mxfp4_config_file_name

        return mxfp4_config_file_name(E, I, device_name(device))

    def meta(self, args) -> dict:
        return dict(dtype="mxfp4", activations="bfloat16", activation="swiglu_oai")

    def fallback(self, shape, device, tokens) -> dict:
        from moelink.kernels.moe_config import _pick, device_name
        from moelink.kernels.triton_moe_mxfp4 import mxfp4_config_table

        E, K, D, I = shape
        table = mxfp4_config_table(E, I, device_name(device))
        return {T: _pick(*table, T, K, E) for T in tokens}
