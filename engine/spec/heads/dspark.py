"""DSpark draft layers in the DFlash format (SGLang's `DSparkDraftModel` / `Qwen3DSparkModel`), a checkpoint of
their own beside a target's: the `DSparkStages` of engine/models/blocks/dspark.py for it, and the Markov head every
DSpark draft shares (engine/config/dspark.py says what DSpark computes).

Legend: T tokens of the step, R requests drafting, B block slots, C context entries per request, D hidden (the
target's), N / K query / kv heads, H head dim, I intermediate size, V vocabulary, Rk the Markov rank.

Checkpoint tensors (names as published, no "model." prefix):
    fc.weight [D, n D], hidden_norm.weight [D]          the n tapped target states, concatenated, projected
    layers.{i}.input_layernorm.weight [D], layers.{i}.post_attention_layernorm.weight [D]
    layers.{i}.self_attn.{q,k,v}_proj.weight [NH|KH, D] (biases with attention_bias), o_proj.weight [D, NH]
    layers.{i}.self_attn.{q,k}_norm.weight [H]          per-head RMSNorm (Qwen3)
    layers.{i}.mlp.{gate,up}_proj.weight [I, D], mlp.down_proj.weight [D, I]
    norm.weight [D]                                     before the target's LM head
    markov_head.markov_w1.weight [V, Rk], markov_head.markov_w2.weight [V, Rk]
    confidence_head.*                                   (optional; not read: moelink verifies every draft)
The embedding and LM head are the target's.

A stage (Qwen3 decoder layer, pre-norm) over the block x [R, B, D]: h = input_layernorm(x); queries, keys and values
of the block from h (q/k per-head normed, rope at the block's positions); the context keys and values come from
the projected target states c = hidden_norm(fc(taps)) through the same k/v projections (k normed, rope at the
context token's position) and are what the stage's cache keeps, [2, K, H] a token; attention over [context before
the anchor | the whole block], no causal mask (DFlash's ENCODER_ONLY attention); x += o_proj(attn);
x += mlp(post_attention_layernorm(x)). The block's own keys are never cached.
"""
from __future__ import annotations

import math
from typing import Collection

import torch
from torch import nn
import torch.nn.functional as F

from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.dspark import DSparkConfig, DSparkGQAConfig
from ...models.blocks.dspark import MarkovHead
from ...models.layers import param

# Tensors a DFlash-format checkpoint may carry that moelink does not read (module docstring).
UNREAD_PREFIXES = ("confidence_head.",)


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, statistics in float32 at least (float64 stays float64)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.to(xf.dtype)).to(x.dtype)


def rope_neox(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate every head dim of x [..., H] (neox halves) at `positions` (x's leading shape minus the head axis)."""
    H = x.shape[-1]
    ft = torch.promote_types(x.dtype, torch.float32)
    inv = theta ** (-torch.arange(0, H, 2, device=x.device, dtype=ft) / H)
    ang = positions.to(ft)[..., None] * inv  # [..., H/2]
    cos, sin = ang.cos()[..., None, :], ang.sin()[..., None, :]  # one per head
    x1, x2 = x.to(ft).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class GQAStage(nn.Module):
    """One Qwen3 decoder layer as a DSpark stage (module docstring)."""

    def __init__(self, g: DSparkGQAConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.g = g
        D, N, K, H, I = g.hidden_size, g.num_heads, g.num_kv_heads, g.head_dim, g.intermediate_size
        p = lambda *s: param(*s, dtype=dtype, device=device)  # noqa: E731
        self.ln1, self.ln2, self.q_norm, self.k_norm = p(D), p(D), p(H), p(H)
        self.wq, self.wk, self.wv, self.wo = p(N * H, D), p(K * H, D), p(K * H, D), p(D, N * H)
        bias = g.attention_bias
        self.bq, self.bk, self.bv = (p(N * H), p(K * H), p(K * H)) if bias else (None, None, None)
        self.bo = p(D) if bias else None
        self.gate, self.up, self.down = p(I, D), p(I, D), p(D, I)

    def kv(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[..., 2, K, H]: normed, rotated keys and the values of x [..., D] at `positions` [...]."""
        g = self.g
        k = F.linear(x, self.wk, self.bk).unflatten(-1, (g.num_kv_heads, g.head_dim))
        v = F.linear(x, self.wv, self.bv).unflatten(-1, (g.num_kv_heads, g.head_dim))
        k = rope_neox(rms(k, self.k_norm, g.rms_norm_eps), positions, g.rope_theta)
        return torch.stack([k, v], dim=-3)

    def forward(self, x_RBD: torch.Tensor, positions_RB: torch.Tensor, ctx_RCX: torch.Tensor,
                valid_RC: torch.Tensor) -> torch.Tensor:
        g = self.g
        R, B, _ = x_RBD.shape
        h = rms(x_RBD, self.ln1, g.rms_norm_eps)
        q = F.linear(h, self.wq, self.bq).unflatten(-1, (g.num_heads, g.head_dim))
        q = rope_neox(rms(q, self.q_norm, g.rms_norm_eps), positions_RB, g.rope_theta)
        kv = torch.cat([ctx_RCX.to(h.dtype), self.kv(h, positions_RB)], dim=1)  # [R, C + B, 2, K, H]
        k_RSKH, v_RSKH = kv[:, :, 0], kv[:, :, 1]
        G = g.num_heads // g.num_kv_heads
        q = q.view(R, B, g.num_kv_heads, G, g.head_dim)
        ft = torch.promote_types(h.dtype, torch.float32)
        s = torch.einsum("rbkgh,rskh->rkgbs", q.to(ft), k_RSKH.to(ft)) / math.sqrt(g.head_dim)
        mask = torch.cat([valid_RC, valid_RC.new_ones(R, B)], dim=1)  # the block sees itself whole
        s = s.masked_fill(~mask[:, None, None, None, :], float("-inf"))
        o = torch.einsum("rkgbs,rskh->rbkgh", s.softmax(-1), v_RSKH.to(ft)).reshape(R, B, -1).to(h.dtype)
        x_RBD = x_RBD + F.linear(o, self.wo, self.bo)
        h = rms(x_RBD, self.ln2, g.rms_norm_eps)
        return x_RBD + F.linear(F.silu(F.linear(h, self.gate)) * F.linear(h, self.up), self.down)

    def weight_plan(self, prefix: str) -> WeightPlan:
        a = prefix + "self_attn."
        names = {"input_layernorm.weight": self.ln1, "post_attention_layernorm.weight": self.ln2,
                 "self_attn.q_norm.weight": self.q_norm, "self_attn.k_norm.weight": self.k_norm,
                 "self_attn.q_proj.weight": self.wq, "self_attn.k_proj.weight": self.wk,
                 "self_attn.v_proj.weight": self.wv, "self_attn.o_proj.weight": self.wo,
                 "mlp.gate_proj.weight": self.gate, "mlp.up_proj.weight": self.up, "mlp.down_proj.weight": self.down}
        plan = {prefix + n: PlanEntry(t, ()) for n, t in names.items()}
        if self.g.attention_bias:
            plan.update({a + "q_proj.bias": PlanEntry(self.bq, ()), a + "k_proj.bias": PlanEntry(self.bk, ()),
                         a + "v_proj.bias": PlanEntry(self.bv, ()), a + "o_proj.bias": PlanEntry(self.bo, ())})
        return plan


class DSparkGQAStages(nn.Module):
    """A DFlash-format DSpark draft (module docstring) as the drafter's `DSparkStages`. `embed_tokens` / `lm_head`:
    the target's tables, whole [V, D] (under TP gathered from the rank's shards)."""

    window: int | None = None  # full attention over the context
    has_experts = False  # dense: no collective under expert parallelism

    def __init__(self, dspark: DSparkConfig, g: DSparkGQAConfig, dtype: torch.dtype, device: torch.device,
                 embed_tokens: torch.Tensor, lm_head: torch.Tensor):
        super().__init__()
        self.dspark, self.g = dspark, g
        D, n = g.hidden_size, len(dspark.target_layer_ids)
        self.fc = param(D, n * D, dtype=dtype, device=device)
        self.hidden_norm, self.norm = param(D, dtype=dtype, device=device), param(D, dtype=dtype, device=device)
        self.stages = nn.ModuleList(GQAStage(g, dtype, device) for _ in range(g.num_layers))
        self.markov = MarkovHead(g.vocab_size, dspark.markov_rank, dtype, device)
        # The target's tables, in a tuple: as attributes they would count as this module's parameters.
        self.tables = (embed_tokens, lm_head)

    @property
    def module(self) -> nn.Module:
        return self

    def row_shapes(self) -> list[tuple[int, ...]]:
        return [(2, self.g.num_kv_heads, self.g.head_dim)] * len(self.stages)

    def context_rows(self, taps_TD: list[torch.Tensor], positions_T: torch.Tensor) -> list[torch.Tensor]:
        c_TD = rms(F.linear(torch.cat(taps_TD, dim=-1).to(self.fc.dtype), self.fc), self.hidden_norm,
                   self.g.rms_norm_eps)
        return [stage.kv(c_TD, positions_T) for stage in self.stages]

    def base_logits(self, ids_RB: torch.Tensor, positions_RB: torch.Tensor, ctx_RCX: list[torch.Tensor],
                    valid_RC: torch.Tensor) -> torch.Tensor:
        embed, head = self.tables
        x = F.embedding(ids_RB, embed).to(self.fc.dtype)
        for stage, ctx in zip(self.stages, ctx_RCX):
            x = stage(x, positions_RB, ctx, valid_RC)
        h = rms(x, self.norm, self.g.rms_norm_eps)
        return F.linear(h.to(head.dtype), head).float()

    def markov_bias(self, prev_R: torch.Tensor) -> torch.Tensor:
        return self.markov(prev_R)

    def weight_plan(self) -> WeightPlan:
        plan: WeightPlan = {"fc.weight": PlanEntry(self.fc, ()), "hidden_norm.weight": PlanEntry(self.hidden_norm, ()),
                            "norm.weight": PlanEntry(self.norm, ())}
        for i, stage in enumerate(self.stages):
            plan.update(stage.weight_plan(f"layers.{i}."))
        plan.update(self.markov.weight_plan("markov_head."))
        return plan

    def run_idle(self) -> None:
        raise AssertionError("DFlash-format DSpark stages are dense: no collectives to run (has_experts is False)")


def check_names(path: str, names: Collection[str], plan: WeightPlan) -> None:
    """One ValueError naming every tensor the draft needs and the checkpoint lacks, and every one it has that the
    format does not (the confidence head's are allowed and left unread)."""
    have = set(names)
    missing = sorted(set(plan) - have)
    extra = sorted(n for n in have - set(plan) if not n.startswith(UNREAD_PREFIXES))
    problems = [f"missing {n!r}" for n in missing] + [f"unexpected {n!r}" for n in extra]
    if problems:
        raise ValueError(f"DSpark draft checkpoint {path!r}: " + "; ".join(problems[:6])
                         + (f" (and {len(problems) - 6} more)" if len(problems) > 6 else "") + ".")


__all__ = ["DSparkGQAStages", "GQAStage", "UNREAD_PREFIXES", "check_names", "rms", "rope_neox"]
