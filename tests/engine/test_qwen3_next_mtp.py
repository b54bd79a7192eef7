"""Qwen3-Next's MTP module (engine/spec/heads/qwen_mtp.py) as a speculative drafter (method "mtp") on a hybrid model.

Oracles:
- The module's forward against a float64 reference composed of transformers' own Qwen3-Next classes (its
  Qwen3NextDecoderLayer built as a full-attention layer, Qwen3NextRMSNorm, Qwen3NextRotaryEmbedding) holding the
  checkpoint's `mtp.*` tensors, over whole sequences with a causal mask (transformers runs no MTP module itself):
      out = norm(layer(fc([pre_fc_norm_embedding(emb(tok_{t+1})) | pre_fc_norm_hidden(h_t)])));  logits = head(out)
  The engine's layer runs the same rows as two steps (prefixes, then the rest over its KV cache).
- Every draft the engine proposes equals transformers' final-normed hidden states chained through that reference
  (the drafter's conditioning, positions and chain).
- Greedy tokens with MTP drafts equal transformers' greedy tokens (float64, chunked prefill, several sequences per
  step, preemption, then the same prompts again as prefix-cache hits): a verify step's rejected drafts roll the
  linear-attention states back (GatedDeltaNet.replay_states), so any drift would show as a different token.
The checkpoint: tests.helpers.hf_checkpoints' qwen3_next (saved by transformers) with a random MTP module appended
(engine/tools/qwen_mtp_checkpoint.py), and a "bigram" copy whose MTP module guesses the main model's next token
(drafts accepted often and rejected too).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.registry import arch_spec
from moelink.engine.spec.heads import QwenMTPLayer, make_mtp_layer, mtp_checkpoint_names
from moelink.engine.models.layers import ForwardContext
from moelink.engine.rank.loader import SafetensorsCheckpoint, load_plan
from moelink.engine.tools.qwen_mtp_checkpoint import MTP_FILE, add_qwen_mtp_module
from moelink.kernels.ops import ReferenceKernels

from tests.helpers.draft_spy import record_drafts
from tests.helpers.hf_checkpoints import VOCAB, hf_config
from tests.helpers.paged_meta import paged_meta
from tests.helpers.parity import assert_pool_free, assert_same, engine_greedy, hf_greedy, prompts
from tests.helpers.qwen_mtp_checkpoints import bigram_mtp, with_mtp

CPU = torch.device("cpu")
BLOCK = 4
SEQS = ((5, 3), (7, 1))  # (prefix tokens of the first step, tokens of the second) per sequence


@pytest.fixture(scope="module")
def checkpoints(hf_tiny_model, tmp_path_factory):
    """{"random": qwen3_next with a random MTP module, "bigram": its copy whose MTP module guesses the main
    model's next token}."""
    random_ = with_mtp(hf_tiny_model("qwen3_next"), tmp_path_factory.mktemp("qwen3_next_mtp") / "random")
    return {"random": str(random_), "bigram": str(bigram_mtp(random_, tmp_path_factory.mktemp("qwen3_next_mtp")
                                                               / "bigram"))}


def _tensors(path: str) -> dict[str, torch.Tensor]:
    ckpt = SafetensorsCheckpoint(path)
    out = {}
    for st, names in ckpt.open(list(ckpt.keys())):
        out.update({n: st.get_tensor(n).to(torch.float64) for n in names})
    return out


class _Reference:
    """The MTP module composed of transformers' own Qwen3-Next classes holding the checkpoint's mtp.* tensors
    (module docstring), float64."""

    def __init__(self, path: str):
        from transformers.models.qwen3_next.modeling_qwen3_next import (Qwen3NextDecoderLayer, Qwen3NextRMSNorm,
                                                                         Qwen3NextRotaryEmbedding)

        self.t = t = _tensors(path)
        cfg = hf_config("qwen3_next")
        cfg._attn_implementation = "sdpa"  # float64 scores and softmax, as moelink's attention
        # vLLM builds the MTP layer as a full-attention layer at index 0 (its MLP kind is layer 0's).
        cfg.layer_types = ["full_attention"] + list(cfg.layer_types[1:])
        self.layer = Qwen3NextDecoderLayer(cfg, 0).to(torch.float64)
        p, E = "mtp.layers.0.", cfg.num_experts
        state = {}
        for key in self.layer.state_dict():
            if key == "mlp.experts.gate_up_proj":
                state[key] = torch.stack([torch.cat([t[f"{p}mlp.experts.{e}.gate_proj.weight"],
                                                     t[f"{p}mlp.experts.{e}.up_proj.weight"]]) for e in range(E)])
            elif key == "mlp.experts.down_proj":
                state[key] = torch.stack([t[f"{p}mlp.experts.{e}.down_proj.weight"] for e in range(E)])
            else:
                state[key] = t[p + key]
        self.layer.load_state_dict(state, strict=True)  # every tensor of transformers' layer from the checkpoint
        self.layer.eval()

        def norm(name: str):
            n = Qwen3NextRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps).to(torch.float64)
            n.weight.data.copy_(t[name])
            return n

        self.norm_e, self.norm_h, self.norm_out = (norm("mtp.pre_fc_norm_embedding.weight"),
                                                   norm("mtp.pre_fc_norm_hidden.weight"), norm("mtp.norm.weight"))
        self.rope = Qwen3NextRotaryEmbedding(cfg).to(torch.float64)
        self.embed, self.head = t["model.embed_tokens.weight"], t["lm_head.weight"]

    @torch.no_grad()
    def __call__(self, ids, hidden):
        """Per sequence (token ids [n], conditioning states [n, D], positions from 0): output rows [n, D], logits
        [n, V]."""
        outs, logits = [], []
        for ids_n, h_nD in zip(ids, hidden):
            x = F.linear(torch.cat([self.norm_e(self.embed[ids_n]), self.norm_h(h_nD)], dim=-1),
                         self.t["mtp.fc.weight"])[None]
            n = x.shape[1]
            pos = torch.arange(n)[None]
            mask = torch.full((n, n), torch.finfo(torch.float64).min, dtype=torch.float64).triu(1)[None, None]
            y = self.layer(x, position_embeddings=self.rope(x, pos), attention_mask=mask, position_ids=pos)
            out = self.norm_out((y[0] if isinstance(y, tuple) else y)[0])
            outs.append(out)
            logits.append(F.linear(out, self.head))
        return outs, logits


def test_mtp_module_matches_transformers_layers_in_float64(checkpoints):
    path = checkpoints["random"]
    cfg = ModelConfig.from_pretrained(path, "float64")
    assert cfg.num_nextn_predict_layers == 1  # config.json's mtp_num_hidden_layers
    L = cfg.num_layers
    ckpt = SafetensorsCheckpoint(path)
    names = frozenset(ckpt.keys())
    t = _tensors(path)
    embed = torch.nn.Parameter(t["model.embed_tokens.weight"], requires_grad=False)
    head = torch.nn.Parameter(t["lm_head.weight"], requires_grad=False)
    mtp = make_mtp_layer(cfg, arch_spec(cfg.architecture), 0, ReferenceKernels(), CPU, None, names,
                         embed_tokens=embed, lm_head=head)
    assert isinstance(mtp, QwenMTPLayer) and mtp.layer.moe is not None
    plan = mtp.weight_plan(names)
    assert set(plan) == set(mtp_checkpoint_names(cfg, names)), "the MTP plan reads exactly the mtp.* tensors"
    load_plan(ckpt, plan, CPU)
    mtp.process_weights_after_loading()
    mtp.eval()

    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(0, VOCAB, (a + n,), generator=g) for a, n in SEQS]
    hidden = [torch.randn(a + n, cfg.hidden_size, generator=g, dtype=torch.float64) for a, n in SEQS]
    want_out, want_logits = _Reference(path)(ids, hidden)

    tables, num_blocks = [[0, 5, 2], [4, 1]], 6  # out of order: slots come from the tables
    caches = [() for _ in range(L)] + [tuple(torch.zeros(s, dtype=torch.float64)
                                             for s in cfg.attention.cache_shapes(num_blocks, BLOCK))]
    for first in (True, False):  # the prefixes (positions from 0), then the rest over the cached prefixes
        starts = [0 if first else a for a, _ in SEQS]
        lens = [a if first else n for a, n in SEQS]
        rows = [slice(s, s + n) for s, n in zip(starts, lens)]
        ctx = ForwardContext(paged_meta(starts, lens, tables, num_blocks, BLOCK), caches)
        positions = torch.cat([torch.arange(r.start, r.stop) for r in rows])
        with torch.no_grad():
            out = mtp(positions, torch.cat([i[r] for i, r in zip(ids, rows)]),
                      torch.cat([h[r] for h, r in zip(hidden, rows)]), ctx)
            logits = mtp.compute_logits(out)
        # To float32's rounding, not float64's: transformers' Qwen3NextRMSNorm normalises and scales in float32
        # whatever the dtype (moelink's normalises in float32 and scales in the model's), and both routers take a
        # float32 softmax. A structural slip (the concatenation's order, a norm left out, a weight misread) is
        # off by ~1e-1.
        torch.testing.assert_close(out, torch.cat([w[r] for w, r in zip(want_out, rows)]), rtol=1e-6, atol=2e-6)
        torch.testing.assert_close(logits, torch.cat([w[r] for w, r in zip(want_logits, rows)]),
                                   rtol=1e-6, atol=2e-6)
    assert mtp.moe_stats.counts_LG.sum() == sum(a + n for a, n in SEQS) * cfg.top_k  # its own counters


def test_mtp_num_hidden_layers_is_read_and_the_main_model_leaves_mtp_unread(checkpoints, hf_tiny_model):
    assert ModelConfig.from_pretrained(hf_tiny_model("qwen3_next")).num_nextn_predict_layers == 0
    path = checkpoints["random"]
    cfg = ModelConfig.from_pretrained(path)
    names = set(SafetensorsCheckpoint(path).keys())
    mtp_names = set(mtp_checkpoint_names(cfg, names))
    with open(f"{path}/model.safetensors.index.json") as f:
        assert mtp_names == {n for n, file in json.load(f)["weight_map"].items() if file == MTP_FILE}
    with pytest.raises(ValueError, match="MTP layer 1 does not exist"):
        QwenMTPLayer(cfg, arch_spec(cfg.architecture), 1, ReferenceKernels(), CPU)
    from moelink.engine.tools.tiny_hf_model import add_mtp_layers

    with pytest.raises(ValueError, match="no MTP layers in DeepSeek-V3's layout.*add_qwen_mtp_module"):
        add_mtp_layers(path)  # refused before it writes anything
    with pytest.raises(ValueError, match="already holds mtp"):
        add_qwen_mtp_module(path)
    from moelink.engine.config.engine_args import EngineArgs

    args = EngineArgs(model=hf_tiny_model("qwen3_next"), speculative_config={"method": "mtp",
                                                                             "num_speculative_tokens": 1})
    with pytest.raises(ValueError, match="method='mtp' is invalid for this checkpoint.*mtp_num_hidden_layers"):
        args.create_engine_config()  # a checkpoint saved without its MTP module


def _kw(**extra):
    # 64-token steps chunk the longer prompts; 24 blocks of 8 tokens cannot hold every request: preemptions.
    return dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=64, num_kv_blocks=24, block_size=8,
                num_state_checkpoints=8, **extra)


@pytest.mark.slow
def test_greedy_with_mtp_drafts_equals_transformers_with_prefix_hits(checkpoints):
    """Drafts accepted and rejected (bigram MTP, k = 2), preemption, then every prompt again (prefix-cache hits from
    state checkpoints): greedy tokens equal transformers' own greedy decoding."""
    path = checkpoints["bigram"]
    ps = prompts(VOCAB, seed=42, n=10, lo=1, hi=150)
    want = hf_greedy(path, ps)
    llm = LLM(path, speculative_config={"method": "mtp", "num_speculative_tokens": 2}, **_kw())
    assert_same(engine_greedy(llm, ps), want, ps)
    stats = llm.engine.stats()
    assert stats.num_preemptions_total > 0
    hits = stats.prefix_cache_hits
    assert_same(engine_greedy(llm, ps), want, ps)
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits > hits
    sd = stats.spec_decode
    print(f"qwen3_next bigram MTP k=2: acceptance {sd.acceptance_rate:.3f} ({sd.num_accepted_tokens} of "
          f"{sd.num_draft_tokens} drafts; per position {sd.accepted_per_position})")
    assert 0.3 < sd.acceptance_rate < 1.0, sd  # accepted often, rejected too: both paths of the rollback run
    assert sum(sd.accepted_per_position) == sd.num_accepted_tokens
    assert_pool_free(llm)


@pytest.mark.slow
def test_random_mtp_module_drafts_rejected_still_exact(checkpoints):
    """A random MTP module (its drafts almost always rejected, k = 1): greedy equals transformers'."""
    path = checkpoints["random"]
    ps = prompts(VOCAB, seed=8, n=4, lo=1, hi=80)
    llm = LLM(path, speculative_config={"method": "mtp", "num_speculative_tokens": 1}, **_kw())
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)
    assert llm.engine.stats().spec_decode.num_draft_tokens > 0
    assert_pool_free(llm)


@pytest.mark.slow
def test_qwen3_5_moe_multimodal_checkpoint_drafts_with_its_top_level_mtp(hf_tiny_model, tmp_path):
    """Qwen3.5-MoE as published: the text model under model.language_model., the MTP module at the top level
    (mtp.*) and its count in text_config's mtp_num_hidden_layers; greedy with MTP drafts equals transformers'."""
    path = tmp_path / "qwen3_5_mtp"
    shutil.copytree(hf_tiny_model("qwen3_5_moe"), path)
    add_qwen_mtp_module(path, seed=4)
    cfg = ModelConfig.from_pretrained(str(path))
    assert cfg.num_nextn_predict_layers == 1 and cfg.text_weights_prefix == "model.language_model."
    names = set(SafetensorsCheckpoint(str(path), cfg.text_weights_prefix).keys())
    assert mtp_checkpoint_names(cfg, names) and all(n.startswith("mtp.") for n in mtp_checkpoint_names(cfg, names))
    ps = prompts(VOCAB, seed=7, n=4, lo=1, hi=60)
    llm = LLM(str(path), speculative_config={"method": "mtp", "num_speculative_tokens": 2}, **_kw())
    assert_same(engine_greedy(llm, ps), hf_greedy(str(path), ps), ps)
    assert llm.engine.stats().spec_decode.num_draft_tokens > 0
    assert_pool_free(llm)


def test_dummy_weights_and_an_eagle3_refusal(checkpoints, tmp_path):
    """load_format='dummy' builds the MTP module in the Qwen layout too; EAGLE-3 heads are refused for hybrid
    models, naming the method."""
    from moelink.engine.config.engine_args import EngineArgs
    from moelink.engine.tools.eagle3_checkpoint import write_eagle3_checkpoint

    llm = LLM(checkpoints["random"], dtype="float32", load_format="dummy", max_num_seqs=2, num_kv_blocks=32,
              block_size=16, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    assert len(engine_greedy(llm, [[1, 2, 3, 4, 5]])[0]) == 10
    assert_pool_free(llm)
    head = write_eagle3_checkpoint(tmp_path / "head", vocab_size=VOCAB, draft_vocab_size=None, target_hidden_size=32)
    args = EngineArgs(model=checkpoints["random"], speculative_config={"method": "eagle3", "model": str(head),
                                                                      "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="method='eagle3' is not supported for Qwen3NextForCausalLM"):
        args.create_engine_config()


@pytest.mark.slow
def test_mtp_drafting_reads_nothing_back_from_the_device(checkpoints, monkeypatch):
    """The drafter's device work on a hybrid model (catch-up, accepted offsets, chain over the Qwen MTP module)
    makes no device→host sync: counted on CPU by tests.helpers.host_syncs, with the CPU reference expert
    kernel's own per-expert loop left out (as tests/engine/test_spec_decode_mtp.py counts DeepSeek's)."""
    from moelink.engine.spec.proposer.mtp import MTPDrafter
    from moelink.moe.layer import MoELayer

    from tests.helpers.host_syncs import HostSyncCounter

    draft = MTPDrafter.draft
    with HostSyncCounter() as counter:
        def counted(self, *args, **kwargs):
            for m in self.layer.modules():
                if isinstance(m, MoELayer) and not hasattr(m.expert_format, "_paused"):
                    run = m.expert_format.run

                    def paused(*a, _run=run, **k):
                        with counter.paused():
                            return _run(*a, **k)
                    m.expert_format.run, m.expert_format._paused = paused, True
            with counter.counting():
                return draft(self, *args, **kwargs)

        monkeypatch.setattr(MTPDrafter, "draft", counted)
        llm = LLM(checkpoints["bigram"], speculative_config={"method": "mtp", "num_speculative_tokens": 3}, **_kw())
        engine_greedy(llm, prompts(VOCAB, seed=2, n=3, lo=2, hi=30), max_new=8)
    assert llm.engine.stats().spec_decode.num_accepted_tokens > 0
    assert counter.count == 0, counter.where


@pytest.mark.slow
def test_mtp_drafts_equal_transformers_states_chained_through_the_reference(checkpoints, monkeypatch):
    """Every draft the engine proposed (random MTP module, k = 3: drafts depend on every part of it, its KV cache
    and the chain included; chunked prefill, preemption) equals an independent recomputation: transformers' own
    Qwen3-Next gives the final-normed hidden states of the sequence, the transformers-composed MTP reference runs
    over the whole of it from scratch, then chains as the drafter does (its own output row and its last draft, one
    position on)."""
    from transformers import AutoModelForCausalLM

    path, k = checkpoints["random"], 3
    seen = record_drafts(monkeypatch)
    ps = prompts(VOCAB, seed=17, n=4, lo=2, hi=40)
    llm = LLM(path, speculative_config={"method": "mtp", "num_speculative_tokens": k}, **_kw())
    engine_greedy(llm, ps, max_new=8)
    assert len(seen) > 20
    main = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
    ref = _Reference(path)
    wrong = []
    for tokens, drafts in seen:
        m = len(tokens) - 1  # x_m was just emitted: rows t = 0 .. m-1 read (h_t, x_{t+1})
        with torch.no_grad():
            h = main(torch.tensor([tokens[:m]]), output_hidden_states=True).hidden_states[-1][0]
        rows_h, rows_tok, want = h, torch.tensor(tokens[1:]), []
        for _ in range(k):
            (out,), (logits,) = ref([rows_tok], [rows_h])
            d = int(logits[-1].argmax())
            want.append(d)
            rows_h, rows_tok = torch.cat([rows_h, out[-1:]]), torch.cat([rows_tok, torch.tensor([d])])
        if drafts != want:
            wrong.append((len(tokens), drafts, want))
    assert not wrong, f"{len(wrong)} of {len(seen)} drafts differ, e.g. {wrong[:3]}"
