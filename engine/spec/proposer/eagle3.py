"""The EAGLE-3 drafter (speculative method "eagle3"): a head from its own checkpoint (engine/spec/heads/eagle3.py)
drafting inside the step's device work, as a ChainDrafter (engine/spec/proposer/chain.py: catch-up over the step's
tokens shifted by one, then k - 1 chained greedy drafts, scratch blocks, no host sync) over `Eagle3DraftLayer`.

Legend: T tokens of the step's flat batch, D the head's hidden, Dt the main model's, R rows that sample.

The conditioning state (vLLM's and SGLang's EAGLE-3 drafters): the catch-up row at position t reads
g_t = fc([s_low | s_mid | s_high]_t), the residual stream of the main model at t after the three layer counts
`eagle3_aux_layers` names (captured by the main model's own forward: models/layers.AuxCapture), with tok_{t+1};
a chained step reads the head's own previous output (its state before `norm`) and its last draft. Drafts are
the greedy ids of the head's draft vocabulary, mapped to target ids through d2t.

The head is dense (one Llama layer): under expert parallelism a rank drafts for its own requests and runs nothing
when it has no rows; no collective, so the ranks' accepted lengths never need to agree. Its KV cache is one
extra layer at index num_hidden_layers (vLLM's), in the head's own GQA shape and the main cache's dtype, on the
main model's block ids (KV sizing counts it: ChainDrafter.kv_bytes_per_token). Its rope table covers the main
model's max_model_len, whatever the head's max_position_embeddings.

Tensor parallelism: the head is replicated, whole, on every rank of a TP group, and each rank drafts with it.
Why not split it like a main layer: it is one small dense layer, its inputs (the residual-stream states after a
row-parallel all-reduce, the emitted tokens, the first rank's on every rank) are the same on every rank, and only
the group's first rank's drafts are verified (engine/cluster/ray_executor.tp_group_outputs), so a whole copy costs
no collective per step, where a split head would all-reduce twice per draft forward. Where the head shares the
target's embedding or LM head, the rank's vocab shards of that table are all-gathered once at load into a whole
one for it (V x D on every rank: the price of no per-step collective; the public heads with a draft vocabulary
hold their own LM head, so it is the embedding alone, and a head with both tables of its own gathers nothing).
"""
from __future__ import annotations

import torch

from ...config.eagle3 import Eagle3Config, check_eagle3_target, read_eagle3_config
from ...config.model import ModelConfig
from ..heads.eagle3 import Eagle3Head
from ...models.layers import ForwardContext
from .chain import ChainDrafter
from .eagle3_loader import dummy_eagle3_head, load_eagle3_head
from ...rank.loader import SafetensorsCheckpoint
from ...tp.group import TensorParallel


class Eagle3DraftLayer:
    """An Eagle3Head as a chain drafter's DraftLayer (module docstring)."""

    has_experts = False  # one dense Llama layer: no collective under expert parallelism

    def __init__(self, head: Eagle3Head, aux_layers: tuple[int, int, int], cache_dtype: torch.dtype):
        self.module = head
        self.kv_cache_index = head.self_attn.layer_idx
        self.attention, self.cache_dtype = head.cfg.attention, cache_dtype
        self.aux_layers = tuple(aux_layers)

    def condition(self, h_TD: torch.Tensor, aux: list[torch.Tensor]) -> torch.Tensor:
        return self.module.combine_hidden(*aux)  # the residual-stream states, not the final-normed h_TD

    def __call__(self, positions_T, input_ids_T, hidden_TD, ctx: ForwardContext) -> torch.Tensor:
        return self.module(positions_T, input_ids_T, hidden_TD, ctx)

    def greedy(self, y_RD: torch.Tensor) -> torch.Tensor:
        return self.module.to_target_ids(self.module.compute_logits(y_RD).argmax(dim=-1))

    def moe_only_stages(self):
        raise AssertionError("an EAGLE-3 head is dense: it has no collectives to run (has_experts is False)")


def load_draft_head(path: str, cfg: ModelConfig, model, kernels, device: torch.device, load_format: str = "auto",
                    head_cfg: Eagle3Config | None = None, tp: TensorParallel | None = None) -> Eagle3Head:
    """The head in directory `path` for main model `cfg` / `model` (its embedding and LM head stand in where the
    head has none; under `tp` gathered whole from the rank's vocab shards: module docstring), or a random one of
    that config.json (load_format "dummy")."""
    head_cfg = head_cfg if head_cfg is not None else read_eagle3_config(path)
    check_eagle3_target(head_cfg, cfg.vocab_size, cfg.hidden_size, cfg.num_layers)
    embed, head = model.embed_tokens, model.lm_head
    if tp is not None and tp.size > 1:
        embed, head = _whole_target_tables(path, model, cfg.vocab_size, head_cfg, load_format, tp)
    kw = dict(dtype=cfg.dtype, kv_cache_index=cfg.num_layers, embed_tokens=embed,
              lm_head=head, max_positions=cfg.max_model_len)
    if load_format == "dummy":
        return dummy_eagle3_head(head_cfg, kernels, device, **kw)
    return load_eagle3_head(path, kernels, device, config=head_cfg, **kw)


def _whole_target_tables(path: str, model, vocab_size: int, head_cfg: Eagle3Config, load_format: str,
                         tp: TensorParallel):
    """(embedding, LM head) of the target, whole [V, D], for a head under TP: gathered only where the head reads it
    (it has no copy of its own; a tied head reads its embedding for both, so its head slot gets the embedding, as
    at TP 1), None where it has its own. Every rank of the group decides alike from the same head checkpoint and
    gathers together (a collective of the load)."""
    own = frozenset() if load_format == "dummy" else frozenset(SafetensorsCheckpoint(path).keys())
    embed = whole_vocab_table(model.embed_tokens, vocab_size, tp) if "embed_tokens.weight" not in own else None
    head = embed
    if "lm_head.weight" not in own and not head_cfg.tie_word_embeddings:
        tied = model.lm_head is model.embed_tokens
        head = embed if tied and embed is not None else whole_vocab_table(model.lm_head, vocab_size, tp)
    return embed, head


def whole_vocab_table(shard_VsD: torch.Tensor, vocab_size: int, tp: TensorParallel) -> torch.Tensor:
    """[V, D]: a vocab-parallel table's rank shards ([Vs, D] each, engine/tp/vocab.py) side by side, cut to
    the vocabulary, on every rank of the group (load time only)."""
    return tp.all_gather_last(shard_VsD.t().contiguous()).t()[:vocab_size].contiguous()


class Eagle3Drafter(ChainDrafter):
    """The runner's device drafter for method "eagle3" (module docstring). `path`: the head's local checkpoint
    directory (EngineArgs resolved a repo id)."""

    def __init__(self, path: str, cfg: ModelConfig, model, kernels, device: torch.device, ep, k: int,
                 block_size: int, load_format: str = "auto", tp: TensorParallel | None = None):
        head_cfg = read_eagle3_config(path)
        aux_layers = check_eagle3_target(head_cfg, cfg.vocab_size, cfg.hidden_size, cfg.num_layers)
        head = load_draft_head(path, cfg, model, kernels, device, load_format, head_cfg, tp)
        super().__init__(Eagle3DraftLayer(head, aux_layers, cfg.cache_dtype), cfg.max_model_len, device, ep, k,
                         block_size)


__all__ = ["Eagle3DraftLayer", "Eagle3Drafter", "load_draft_head", "whole_vocab_table"]
