"""DeepSeek-V4.1's block kinds (issue 81), registered for the one decoder (engine/models/moe_decoder.py):
embedding → hc_mult residual streams (and the first collapse's mix) → layers → collapse → norm.

"shared_compressed" (the attention kind): attention.py. "lagged_hyper" (the residual kind): V4's hyper-connections
(engine/models/hyper_connections.py's mixes) with one difference in who uses a site's `pre` mix: the attention's
input collapses the streams with the previous site's pre (the embedding's one-hot: stream 0, then the previous
layer's FFN site's), the FFN's with the attention site's, and the final norm's with the last FFN site's; each site's
post / comb expand its own block's output. The stream is (x_TnD, pre_Tn). At an Engram layer the Engram memory
(engram.py) writes into the streams first. The collapse and the expansion run in float32, as transformers' main-branch
V4.1 does. "token_routed" (the FFN kind, DeepSeek-V4's, by name): V4.1's MoE block is V4's without hash layers.
"hc_lagged" / "hc_lagged_head": the ends. "v41": the checkpoint's names as transformers' save_pretrained writes them
(model.embed.weight, model.layers.{i}...., model.norm.weight, lm_head.weight) or as DeepSeek publishes them (the same
without `model.`, head.weight).

Legend: T tokens, n streams, D hidden.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ..blocks.attention import ATTENTION, AttentionKind
from ..blocks.checkpoint import CHECKPOINT, CheckpointKind
from ..blocks.context import BuildContext
from ..blocks.ffn import FFNBlock, ffn_stages
from ..blocks.stream import EMBEDDING, HEAD, RESIDUAL, Head, Layer
from ..hyper_connections import HyperConnection
from ..layers import AuxCapture, ForwardContext
from .attention import Norm, V41Attention
from ..shared_compressed_attention_config import SharedCompressedAttentionConfig
from .engram import Engram, EngramHash
from .reader import EngramLayout, compressed_token_map, published_format
from .rollback import RingRollback
from .rope import RopeTable
from .weights import dequant_plan

logger = logging.getLogger(__name__)


def collapse(x_TnD: torch.Tensor, pre_Tn: torch.Tensor) -> torch.Tensor:
    return (pre_Tn.unsqueeze(-1) * x_TnD.float()).sum(dim=1).to(x_TnD.dtype)


def expand(y_TD: torch.Tensor, x_TnD: torch.Tensor, post_Tn: torch.Tensor, comb_Tnn: torch.Tensor) -> torch.Tensor:
    """out_k = post_k * y + sum_j comb[j, k] * x_j, in float32."""
    mixed = torch.einsum("tjk,tjd->tkd", comb_Tnn.float(), x_TnD.float())
    return (post_Tn.unsqueeze(-1) * y_TD.float().unsqueeze(1) + mixed).to(x_TnD.dtype)


# -- attention: "shared_compressed" ---------------------------------------------------------------------------------
def _ropes(ctx: BuildContext) -> dict:
    cfg = ctx.cfg
    first = cfg.layer_attention[0]
    return {label: RopeTable(rope, cfg.hf_config, cfg.max_model_len, ctx.device)
            for label, rope in (("main", first.rope if not first.compress_rate else
                                 next((a.rope for a in cfg.layer_attention if not a.compress_rate), first.rope)),
                                ("compress", first.compress_rope))}


def _attention(ctx: BuildContext, i: int, attn: SharedCompressedAttentionConfig) -> V41Attention:
    ropes = ctx.shared("v41_ropes", lambda: _ropes(ctx))
    scratch = ctx.shared("v41_scratch", dict)
    cfg = ctx.cfg
    return V41Attention(attn, cfg.hidden_size, ropes, scratch, ctx.kernels, cfg.dtype, ctx.device, tp=ctx.tp)


ATTENTION.add("shared_compressed", AttentionKind("attn", _attention, RingRollback))


# -- residual: "lagged_hyper" ----------------------------------------------------------------------------------------
def _engram_hash(ctx: BuildContext) -> EngramHash:
    """The hashing constants from the checkpoint's tokenizer; a directory with config.json alone (--load-format
    dummy: random weights, nothing a trained hash could match) hashes ids mapped onto the compressed vocabulary by
    their remainder, said in the log."""
    from pathlib import Path

    cfg = ctx.cfg
    hf = cfg.hf_config
    want = int(hf["engram_compressed_vocab_size"])
    tokenizer = Path(cfg.model) / "tokenizer.json"
    if tokenizer.is_file():
        token_map, vocab = compressed_token_map(tokenizer)
        if vocab != want:
            raise ValueError(f"config.json engram_compressed_vocab_size={want!r} does not match the {vocab} "
                             f"normalised tokens of {tokenizer}: every Engram hash would differ from the trained one.")
    elif not any(Path(cfg.model).glob("*.safetensors")):
        logger.warning("%s: no tokenizer.json beside config.json: the Engram layers hash token ids mod "
                       "engram_compressed_vocab_size=%d (random weights: no trained hash to match).", cfg.model, want)
        token_map, vocab = [i % want for i in range(cfg.vocab_size)], want
    else:
        raise ValueError(f"model={cfg.model!r} has no tokenizer.json: {cfg.architecture}'s Engram layers hash token "
                         "ids through the tokenizer's normalised vocabulary (engram_layer_ids needs it).")
    return EngramHash(EngramLayout.from_config(hf, vocab), token_map, ctx.device)


@RESIDUAL.register("lagged_hyper")
class LaggedHyperLayer(Layer):
    """Module docstring: the stream is (x_TnD, pre_Tn)."""

    def __init__(self, ctx: BuildContext, i: int, attention: AttentionKind, attn_cfg: Any,
                 ffn: Callable[[BuildContext, int], FFNBlock]):
        super().__init__(ctx)
        cfg = ctx.cfg
        hc, D, eps = cfg.hyper_connections, cfg.hidden_size, cfg.rms_norm_eps
        assert hc is not None  # reader.py sets it
        self.attn_hc = HyperConnection(hc, D, eps, ctx.device, ctx.kernels)
        self.ffn_hc = HyperConnection(hc, D, eps, ctx.device, ctx.kernels)
        self.attn_norm, self.ffn_norm = Norm(D, eps, cfg.dtype, ctx.device), Norm(D, eps, cfg.dtype, ctx.device)
        self.engram = None
        layers = list(cfg.hf_config.get("engram_layer_ids") or [])
        if i in layers:
            j = layers.index(i)
            hashing = ctx.shared("v41_engram_hash", lambda: _engram_hash(ctx))
            rows = int(cfg.hf_config["engram_num_embeddings"][j])
            self.engram = Engram(j, rows, hashing, D, hc.hc_mult, eps, cfg.dtype, ctx.device)
        self.layer_idx = i
        self.install(ctx, i, attention, attn_cfg, ffn)

    def stages(self, positions_T: torch.Tensor, state: Any, input_ids_T: torch.Tensor | None,
               ctx: ForwardContext):
        x_TnD, pre_Tn = state
        if self.engram is not None:
            assert input_ids_T is not None  # the Engram hashes token ids
            x_TnD = self.engram(x_TnD, input_ids_T, ctx.kv_caches[self.layer_idx][-1], ctx)
        attn_pre, post, comb = self.attn_hc.mixes(x_TnD)
        h_TD = self.mixer(positions_T, self.attn_norm(collapse(x_TnD, pre_Tn)), ctx)
        x_TnD = expand(h_TD, x_TnD, post, comb)
        ffn_pre, post, comb = self.ffn_hc.mixes(x_TnD)
        y_TD = yield from ffn_stages(self.ffn, self.tp, self.ffn_norm(collapse(x_TnD, attn_pre)), input_ids_T)
        return expand(y_TD, x_TnD, post, comb), ffn_pre

    def state_hook(self) -> Engram | None:
        """The Engram look-back around a verify step (engram.py), where the layer has one."""
        return self.engram

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        plan: WeightPlan = {**self.attn_hc.weight_plan(p + "hc_attn"), **self.ffn_hc.weight_plan(p + "hc_ffn"),
                            p + "attn_norm.weight": PlanEntry(self.attn_norm.weight, ()),
                            p + "ffn_norm.weight": PlanEntry(self.ffn_norm.weight, ())}
        if self.engram is not None:
            plan.update(self.engram.weight_plan(p + "engram."))
        plan.update(self.mixer.weight_plan(p + "attn."))
        plan.update(self.ffn.weight_plan(p, layer_idx, cfg, spec, expert_ids, names))
        return plan

    @staticmethod
    def capture(aux: AuxCapture, n: int, state: Any) -> None:
        """The streams flat, [T, n D] (what a drafter conditions on)."""
        aux.take(n, state[0].flatten(1), None)


# -- ends: "hc_lagged", "hc_lagged_head" -----------------------------------------------------------------------------
def embed_streams(cfg: ModelConfig, x_TD: torch.Tensor):
    """hc_mult copies of the embedding, and the first collapse's mix: stream 0 alone."""
    assert cfg.hyper_connections is not None
    n = cfg.hyper_connections.hc_mult
    pre_Tn = torch.zeros(x_TD.shape[0], n, dtype=torch.float32, device=x_TD.device)
    pre_Tn[:, 0] = 1.0
    return x_TD.unsqueeze(1).expand(-1, n, -1).contiguous(), pre_Tn


EMBEDDING.add("hc_lagged", embed_streams)


@HEAD.register("hc_lagged_head")
class LaggedHead(Head):
    """The streams collapsed with the last site's mix, then the norm; the LM head never tied."""

    tieable = False

    def __init__(self, ctx: BuildContext):
        cfg = ctx.cfg
        self.norm = Norm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, ctx.device)
        self.modules = {"norm": self.norm}

    def finish(self, state: Any) -> torch.Tensor:
        return self.norm(collapse(*state))

    def weight_plan(self) -> WeightPlan:
        return {"model.norm.weight": PlanEntry(self.norm.weight, ())}


# -- checkpoint: "v41" ----------------------------------------------------------------------------------------------
def _plan(cfg: ModelConfig, spec: ArchSpec, plan: WeightPlan, names: frozenset[str]) -> WeightPlan:
    """transformers' names (the embedding is `model.embed`), or DeepSeek's where the checkpoint holds those; with
    DeepSeek's FP8 files, every FP8 weight dequantized as it loads (weights.py)."""
    out = {("model.embed.weight" if n == "model.embed_tokens.weight" else n): e for n, e in plan.items()}
    if names and "model.embed.weight" not in names and "embed.weight" in names:
        out = {published_name(n): e for n, e in out.items()}
    block = published_format(cfg.architecture, cfg.hf_config, cfg.quantization)
    return dequant_plan(out, names, block) if block is not None else out


def published_name(name: str) -> str:
    """DeepSeek's name of the tensor transformers calls `name`: no `model.` prefix, the LM head `head.weight`."""
    return "head.weight" if name == "lm_head.weight" else name.removeprefix("model.")


CHECKPOINT.add("v41", CheckpointKind(_plan, lambda cfg, model, updated=None: None))

__all__ = ["LaggedHead", "LaggedHyperLayer", "collapse", "embed_streams", "expand", "published_name"]
