"""An EAGLE-3 draft head (Li et al. 2025, "EAGLE-3"), as the public heads for Llama and Qwen3 publish it: a separate
checkpoint (engine/config/eagle3.py reads its config.json; engine/spec/proposer/eagle3_loader.py loads it), drafting in the
step's device work as speculative method "eagle3" (engine/spec/proposer/eagle3.py).

Legend: T tokens in the flat batch, D the head's hidden size, Dt the target's, V the target's vocabulary, Vd the
head's (draft) vocabulary, N / K query / kv heads, H head dim, I intermediate size.

Checkpoint tensors (names as published, no "model." prefix):
    fc.weight [D, 3 Dt]                               the three target states, concatenated low | mid | high
    midlayer.input_layernorm.weight [D]               RMSNorm of the token embedding
    midlayer.hidden_norm.weight [D]                   RMSNorm of the conditioning state
    midlayer.self_attn.{q,k,v}_proj.weight [NH|KH, 2D] (biases with attention_bias)  over [embedding | hidden]
    midlayer.self_attn.o_proj.weight [D, NH]
    midlayer.post_attention_layernorm.weight [D]
    midlayer.mlp.{gate,up}_proj.weight [I, D], midlayer.mlp.down_proj.weight [D, I]   SiLU-gated
    norm.weight [D], lm_head.weight [Vd, D]           (head absent: the target's, when Vd == V)
    d2t int64 [Vd]                                    target id = draft id + d2t[draft id] (absent: Vd == V, identity)
    t2d bool [V]                                      which target ids the draft vocabulary holds (checked, not used)
    embed_tokens.weight [V, D]                        (absent: the target's embedding, when Dt == D)

For a token at position t with conditioning state g_t (fc of the target's three states at t, or the previous
draft step's output) and the token after it, tok_{t+1}:
    e = input_layernorm(embed(tok_{t+1}));  r = g_t (norm_before_residual: hidden_norm(g_t))
    a = attn([e | hidden_norm(g_t)]);  r = a + r;  y = mlp(post_attention_layernorm(r)) + r
    draft logits(tok_{t+2}) over Vd = lm_head(norm(y))
`forward` returns y (vLLM's hidden_prenorm, SGLang's "aux" state): it conditions the next chained step.
The attention is GQA (engine/models/gqa.py) with its own KV cache, `ctx.kv_caches[kv_cache_index]`, at the
positions the caller gives (vLLM and SGLang: t, the target's position of g_t).
"""
from __future__ import annotations

from typing import Collection

import torch
from torch import nn
import torch.nn.functional as F

from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.eagle3 import Eagle3Config
from ...models.gqa import GQAAttention
from ...models.layers import DenseMLP, ForwardContext, RMSNorm, param
from ...models.linear import FloatLinear, Linear
from ...models.rope import RotaryEmbedding

# Tensors a checkpoint may leave out (module docstring: what stands in for each).
OPTIONAL_TENSORS = ("embed_tokens.weight", "lm_head.weight", "d2t", "t2d")


class Eagle3Head(nn.Module):
    """One EAGLE-3 head (module docstring). `checkpoint_names` (the head checkpoint's tensor names) decides which
    optional tensors it holds; `embed_tokens` [V, D] / `lm_head` [V, D]: the target's, used where the checkpoint
    has none. `kv_cache_index`: where its cache is in ctx.kv_caches (vLLM gives the head layer index
    num_target_layers). `max_positions`: rope table rows, the target's max_model_len (a head's
    max_position_embeddings is what it was trained at, often less than the target runs)."""

    def __init__(self, cfg: Eagle3Config, kernels, device: torch.device, *, dtype: torch.dtype, kv_cache_index: int,
                 checkpoint_names: Collection[str], embed_tokens: torch.Tensor | None = None,
                 lm_head: torch.Tensor | None = None, max_positions: int | None = None):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        names = frozenset(checkpoint_names)
        D, Dt, V, Vd, eps = cfg.hidden_size, cfg.target_hidden_size, cfg.vocab_size, cfg.draft_vocab_size, cfg.rms_norm_eps
        self.own_embed, self.own_head = "embed_tokens.weight" in names, "lm_head.weight" in names
        self.has_d2t, self.has_t2d = "d2t" in names, "t2d" in names
        if not self.has_d2t and Vd != V:
            raise ValueError(f"EAGLE-3 head checkpoint has no d2t: its draft vocabulary (draft_vocab_size={Vd}) needs "
                             f"the draft -> target id map (vocab_size={V}).")
        self.embed_tokens = self._embedding(embed_tokens, device)
        self.lm_head = self._head(lm_head, device)
        self.fc = Linear(3 * Dt, D, FloatLinear(), kernels, dtype, device)
        self.input_layernorm = RMSNorm(D, eps, kernels, dtype, device)
        self.hidden_norm = RMSNorm(D, eps, kernels, dtype, device)
        self.post_attention_layernorm = RMSNorm(D, eps, kernels, dtype, device)
        self.norm = RMSNorm(D, eps, kernels, dtype, device)
        rope = RotaryEmbedding(cfg.rope, cfg.hf_config, max_positions or cfg.max_position_embeddings, kernels, device)
        self.self_attn = GQAAttention(kv_cache_index, D, cfg.attention, eps, rope, kernels, dtype, device,
                                      in_features=2 * D)
        self.mlp = DenseMLP(D, cfg.intermediate_size, dtype, device, kernels=kernels)
        # Offsets, zero (identity) where the checkpoint has none; t2d only to check d2t against at load.
        self.register_buffer("d2t_Vd", torch.zeros(Vd, dtype=torch.int64, device=device))
        self.register_buffer("t2d_V", torch.zeros(V, dtype=torch.bool, device=device) if self.has_t2d else None)

    def _embedding(self, shared: torch.Tensor | None, device) -> torch.Tensor:
        cfg = self.cfg
        if self.own_embed:
            return param(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, device=device)
        if cfg.target_hidden_size != cfg.hidden_size:
            raise ValueError(f"EAGLE-3 head checkpoint has no embed_tokens.weight, and the target's embedding is "
                             f"{cfg.target_hidden_size} wide, not the head's hidden_size={cfg.hidden_size}.")
        return _shared("embed_tokens.weight", "embed_tokens", shared, (cfg.vocab_size, cfg.hidden_size))

    def _head(self, shared: torch.Tensor | None, device) -> torch.Tensor:
        cfg = self.cfg
        if self.own_head:
            return param(cfg.draft_vocab_size, cfg.hidden_size, dtype=self.dtype, device=device)
        if cfg.tie_word_embeddings:  # SGLang's rule; the config checked draft_vocab_size == vocab_size
            return self.embed_tokens
        if cfg.draft_vocab_size != cfg.vocab_size:
            raise ValueError(f"EAGLE-3 head checkpoint has no lm_head.weight: its draft vocabulary "
                             f"(draft_vocab_size={cfg.draft_vocab_size}) has no head to share with the target's.")
        return _shared("lm_head.weight", "lm_head", shared, (cfg.vocab_size, cfg.hidden_size))

    def combine_hidden(self, h_low_TDt: torch.Tensor, h_mid_TDt: torch.Tensor, h_high_TDt: torch.Tensor
                       ) -> torch.Tensor:
        """[T, D]: fc over the target's three states at each token, [T, Dt] each in the model dtype, in the order
        of config.eagle3_aux_layers (low, mid, high). The first draft step's conditioning state."""
        return self.fc(torch.cat([h_low_TDt, h_mid_TDt, h_high_TDt], dim=-1))

    def forward(self, positions_T: torch.Tensor, input_ids_T: torch.Tensor, hidden_TD: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """positions_T int64 [T]; input_ids_T int64 [T] (target ids), the token after each conditioning state;
        hidden_TD [T, D] in the model dtype, the conditioning states (`combine_hidden`'s, or this head's previous
        output). Writes the head's K/V at ctx.attn's slots and attends over its cache. Returns [T, D], the
        state before `norm` (module docstring)."""
        e_TD = self.input_layernorm(F.embedding(input_ids_T, self.embed_tokens))
        g_TD = self.hidden_norm(hidden_TD)
        residual_TD = g_TD if self.cfg.norm_before_residual else hidden_TD
        a_TD = self.self_attn(positions_T, torch.cat([e_TD, g_TD], dim=-1), ctx)
        x_TD, residual_TD = self.post_attention_layernorm.add_forward(a_TD, residual_TD)
        return self.mlp(x_TD) + residual_TD

    def compute_logits(self, hidden_TD: torch.Tensor) -> torch.Tensor:
        """[T, Vd] draft-vocabulary logits of the token after the next, from `forward`'s output rows."""
        return F.linear(self.norm(hidden_TD), self.lm_head)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Target vocabulary ids (int64, draft_ids' shape) of draft-vocabulary ids: id + d2t[id]."""
        return draft_ids + self.d2t_Vd[draft_ids]

    def target_logits(self, logits_TVd: torch.Tensor) -> torch.Tensor:
        """[T, V]: draft logits at their target ids, -inf elsewhere (vLLM's compute_logits), for a sampler or a
        rejection test over the target's vocabulary."""
        out_TV = logits_TVd.new_full((logits_TVd.shape[0], self.cfg.vocab_size), float("-inf"))
        out_TV[:, self.to_target_ids(torch.arange(self.cfg.draft_vocab_size, device=logits_TVd.device))] = logits_TVd
        return out_TV

    def weight_plan(self) -> WeightPlan:
        """Checkpoint tensor name → destination: every tensor this head reads (the expected set, exactly)."""
        plan: WeightPlan = {**self.fc.weight_plan("fc.weight"), **self.norm.weight_plan("norm.weight")}
        for name in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
            plan.update(getattr(self, name).weight_plan(f"midlayer.{name}.weight"))
        plan.update(self.self_attn.weight_plan("midlayer.self_attn."))
        plan.update(self.mlp.weight_plan("midlayer.mlp."))
        if self.own_embed:
            plan["embed_tokens.weight"] = PlanEntry(self.embed_tokens, ())
        if self.own_head:
            plan["lm_head.weight"] = PlanEntry(self.lm_head, ())
        if self.has_d2t:
            plan["d2t"] = PlanEntry(self.d2t_Vd, ())
        if self.has_t2d:
            plan["t2d"] = PlanEntry(self.t2d_V, ())
        return plan

    def process_weights_after_loading(self) -> None:
        """Check the loaded d2t (and t2d): each draft id maps into the target vocabulary, no two to the same id, and
        onto exactly the ids t2d marks. Reads the maps on the host once, at load (a device sync, not per step)."""
        V, Vd = self.cfg.vocab_size, self.cfg.draft_vocab_size
        targets = self.to_target_ids(torch.arange(Vd, device=self.d2t_Vd.device)).cpu()  # sync: load time only
        bad = ((targets < 0) | (targets >= V)).nonzero().flatten()
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"EAGLE-3 head tensor 'd2t' maps draft id {i} to target id {int(targets[i])}, outside "
                             f"the target vocabulary [0, {V}).")
        if len(set(targets.tolist())) != Vd:
            raise ValueError("EAGLE-3 head tensor 'd2t' maps two draft ids to the same target id.")
        if self.t2d_V is not None:
            t2d = self.t2d_V.cpu()
            if int(t2d.sum()) != Vd or not bool(t2d[targets].all()):
                raise ValueError(f"EAGLE-3 head tensors 't2d' and 'd2t' disagree: t2d marks {int(t2d.sum())} target "
                                 f"ids, d2t maps the {Vd} draft ids onto others.")


def _shared(name: str, arg: str, shared: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
    """The target's table standing in for a tensor the head checkpoint lacks."""
    if shared is None:
        raise ValueError(f"EAGLE-3 head checkpoint has no {name}: the head shares the target's, so pass it "
                         f"({arg}=...).")
    if tuple(shared.shape) != shape:
        raise ValueError(f"EAGLE-3 head: the target's {arg} is {tuple(shared.shape)}, the head needs {shape}.")
    return shared
