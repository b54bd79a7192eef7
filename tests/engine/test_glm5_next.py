"""GLM-5.3-Flash (transformers' glm5_next, served as the text model of its multimodal checkpoint) against
transformers 5.24's own Glm5NextForConditionalGeneration, text only: config reading and its refusals, and greedy
parity with transformers' forward without a cache (the definition of its sparse attention, as for GLM-5:
tests/engine/test_dsa_families.py), in float64, token for token: 1-150-token prompts together under a small token
budget (chunked prefill over the KDA states and the pooled indexer's cache rows, batches), under preemption with the
same prompts again resuming from state checkpoints (prefix hits asserted), speculative decoding whose rejected
drafts roll the KDA states back, and prefill on one engine, decode on another (the KDA states, MLA latents and
indexer rows travel); what each TP rank reads. What the family adds: the hyper-connection prenorm
layer and the mean head (engine/models/glm5_next/kinds.py over engine/models/hyper_connections.py), NoPE MLA held
with a zero rope part (MLAConfig.rope_in_checkpoint), the pooled DSA selection (IndexerConfig.kpool,
kernels/dsa.reference_dsa_pool_topk) and the clamped SwiGLU of every MLP (MoEConfig.dense_activation "silu_clamp"); KDA with the
safe gate is Kimi Delta Attention's (engine/models/kimi_delta.py). Each was checked to matter: with the pools' table
zeroed, the clamp dropped, or the head taking one stream, the parity test fails."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config import kv_sizing
from moelink.engine.models.kimi_delta_config import KimiDeltaConfig
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.dsa import LightningIndexer
from moelink.engine.models.glm5_next.reader import NOPE_PAD_DIMS
from moelink.engine.models.glm5_next.tiny import PRESET, write

from tests.helpers.drawn_presets import VOCAB, config_of
from tests.helpers.parity import assert_pool_free, assert_same, engine_greedy, hf_greedy_nocache, prompts

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def glm53_path(tmp_path_factory) -> str:
    return write(tmp_path_factory.mktemp("glm5_next"), seed=0, dtype=torch.float64, fmt="float", overrides={})


def _config_dir(tmp_path, **text_fields) -> str:
    """The preset's config.json alone, `text_fields` set in its text_config (as the published file keeps them)."""
    config_of(PRESET).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["text_config"].update(text_fields)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return str(tmp_path)


def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=53, n=10, lo=1, hi=150)


@pytest.mark.slow  # over 1 s: transformers reads the config twice
def test_config(tmp_path):
    """KDA on 0, 3, 5 (the safe gate), NoPE MLA with the pooled indexer on 1, 2, 4 (2 sharing 1's selection), 4
    hyper-connection streams, clamped SwiGLU everywhere; the text model of the multimodal checkpoint."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    assert cfg.architecture == "Glm5NextForCausalLM" and cfg.text_weights_prefix == "model.language_model."
    kinds = [cfg.attention_for(i) for i in range(cfg.num_layers)]
    assert [a.kind for a in kinds] == ["kda", "mla", "mla", "kda", "mla", "kda"] and cfg.linear_layers == (0, 3, 5)
    kda, mla = kinds[0], kinds[1]
    assert isinstance(kda, KimiDeltaConfig) and (kda.num_v_heads, kda.head_k_dim, kda.conv_kernel) == (2, 8, 4)
    assert kda.gate_lower_bound == -5.0 and not kda.decay_in_model_dtype and kda.a_log_float32
    assert not mla.rotary and not mla.rope_in_checkpoint and mla.qk_rope_head_dim == NOPE_PAD_DIMS
    assert mla.softmax_scale == 8 ** -0.5
    ix = mla.indexer
    assert (ix.num_heads, ix.head_dim, ix.topk, ix.kpool, ix.rope_dim, ix.width) == (16, 12, 8, 4, 0, 11)
    assert [cfg.attention_for(i).indexer.shared for i in (1, 2, 4)] == [False, True, False]
    assert cfg.hyper_connections.hc_mult == 4 and cfg.hyper_connections.sinkhorn_iters == 20
    m = cfg.moe
    assert (m.activation, m.swiglu_limit, m.dense_activation, m.n_shared_experts) == ("silu_clamp", 1.0, "silu_clamp", 1)
    assert (m.router.n_group, m.router.topk_group, m.router.scoring_func) == (2, 1, "sigmoid")
    assert cfg.sparse_layers == (1, 2, 3, 4, 5)
    # Per token: three MLA latents (16 + the 64-wide zero rope part) and two indexers' [key | gate] rows (2 x 12),
    # float32 (the config's dtype).
    assert kv_sizing.kv_cache_bytes_per_token(cfg) == (3 * (16 + NOPE_PAD_DIMS) + 2 * 24) * 4
    soft = ModelConfig.from_pretrained(_config_dir(tmp_path / "soft", linear_lower_bound=None))
    assert soft.attention_for(0).gate_lower_bound is None  # Kimi's softplus gate


@pytest.mark.parametrize("fields,match", [
    (dict(indexer_types=["full", "shared", "full", "full", "full", "full"]),
     r"indexer_types=.* is not supported: allowed: 'shared' only on an indexed_attention layer right after"),
    (dict(index_kpool_always_select_tail=False), r"index_kpool_always_select_tail=False is not supported"),
    (dict(layer_types=["linear_attention"] * 6), r"layer_types=.* at least one 'indexed_attention' layer"),
])
def test_config_refusals(tmp_path, fields, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, **fields))


def test_fp8_index_cache_is_refused_naming_the_flag(tmp_path):
    with pytest.raises(ValueError, match=r"index_cache_dtype='fp8' is not supported with index_kpool=4"):
        ModelConfig.from_pretrained(_config_dir(tmp_path), index_cache_dtype="fp8")
    # "auto" beside an fp8 latent keeps the pooled rows float.
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path / "auto"), dtype="float64", kv_cache_dtype="fp8")
    assert cfg.attention.cache_dtypes(cfg.cache_dtype) == (torch.float8_e4m3fn, torch.float64)


def test_an_image_request_is_refused_naming_the_missing_tower(tmp_path):
    from moelink.engine.server.serving import Serving

    reason = Serving.text_only_reason(SimpleNamespace(model=ModelConfig.from_pretrained(_config_dir(tmp_path))))
    assert "vision tower is not loaded" in reason and "Glm5NextForCausalLM" in reason


@pytest.mark.slow  # transformers' forward per token beside the engine, in float64
def test_greedy_parity_chunked_batched_and_sparse(glm53_path, monkeypatch):
    """10 prompts of 1-150 tokens under a 24-token budget (chunked prefills over every state kind, batches of up to
    6): every token equals transformers', the indexer selecting pools (sparse steps)."""
    steps = []
    real = LightningIndexer.forward
    monkeypatch.setattr(LightningIndexer, "forward", lambda self, *a: (
        lambda out: (steps.append(out is not None), out)[1])(real(self, *a)))
    ps = _prompts()
    llm = LLM(glm53_path, dtype="float64", max_num_seqs=6, max_num_batched_tokens=24, num_kv_blocks=256,
              block_size=8)
    got = engine_greedy(llm, ps)
    assert any(steps)
    assert len({t for out in got for t in out}) > 10, "degenerate model: greedy outputs barely vary"
    assert_same(got, hf_greedy_nocache(glm53_path, ps), ps)
    assert_pool_free(llm)


@pytest.mark.slow
def test_greedy_parity_under_preemption_and_prefix_hits(glm53_path):
    """A pool small enough to preempt, then the same prompts again: they resume from KDA state checkpoints with the
    MLA latents and indexer rows of the cached blocks (hits asserted), and still equal transformers."""
    ps = _prompts()
    want = hf_greedy_nocache(glm53_path, ps)
    llm = LLM(glm53_path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=64, num_kv_blocks=24, block_size=8,
              num_state_checkpoints=16)
    assert_same(engine_greedy(llm, ps), want, ps)
    assert llm.engine.stats().num_preemptions_total > 0
    hits_before = llm.engine.stats().prefix_cache_hits
    assert_same(engine_greedy(llm, ps), want, ps)
    assert llm.engine.stats().prefix_cache_hits > hits_before
    assert_pool_free(llm)


@pytest.mark.slow
def test_prefill_on_one_engine_decode_on_another(glm53_path):
    """Prefill/decode over TCP: the KDA states, the MLA latents and the pooled indexer's rows move with the prompt;
    the decode side (past index_topk: sparse from its first token) equals one engine."""
    from tests.helpers.kv_disagg import check_pd_transfer

    check_pd_transfer(glm53_path, prompts(VOCAB, seed=59, n=4, lo=2, hi=60))


def test_online_fp8_holds_the_nope_mla_projections_float(glm53_path):
    """The NoPE MLA rows are moved into a zero-padded layout at load, which FP8 blocks cannot follow: online FP8 over
    the float checkpoint holds q_a / kv_a / q_b float and quantizes the rest (o_proj, the experts); an FP8 checkpoint
    is tests/engine/test_fp8_hybrid_families.py's."""
    from moelink.engine.rank.loader import load_model
    from moelink.kernels.fp8 import FP8_DTYPE
    from moelink.kernels.ops import ReferenceKernels

    cfg = ModelConfig.from_pretrained(glm53_path, "float64", quantization="fp8", fp8_block_size=(16, 16))
    attn = load_model(cfg, ReferenceKernels(), torch.device("cpu")).layers[1].self_attn
    assert attn.fused_a_proj.weight.dtype == attn.q_b_proj.weight.dtype == torch.float64
    assert attn.o_proj.weight.dtype == FP8_DTYPE


def test_each_tp_rank_reads_its_shard(glm53_path):
    """At TP 2 (loading only, one process) each rank reads half of every split tensor and the whole of the rest:
    whole are the hyper-connections, the norms, the router, MLA's a-projections, the pooled indexer, KDA's low-rank
    gates' first halves and its A_log (read whole, cut to the rank's heads), the o_norm weight every head shares;
    halved are MLA's q_b (by head: each rank its heads' nope rows), kv_b, o_proj, KDA's head rows, the experts' and
    the dense MLPs' channels, the embedding and the LM head."""
    from safetensors import safe_open

    from moelink.engine.config.checkpoint_headers import text_model_name
    from moelink.engine.rank.loader import checkpoint_index, load_model
    from moelink.kernels.ops import ReferenceKernels

    cfg = ModelConfig.from_pretrained(glm53_path, "float64")
    full = {}
    for real, f in checkpoint_index(glm53_path).items():
        name = text_model_name(real, cfg.text_weights_prefix)
        if name is not None:
            with safe_open(str(f), framework="pt") as st:
                full[name] = st.get_tensor(real).numel() * 8
    reads = []
    for rank in range(2):
        got: dict[str, int] = {}
        load_model(cfg, ReferenceKernels(), torch.device("cpu"), tp=SimpleNamespace(rank=rank, size=2), read_bytes=got)
        reads.append(got)
    assert set(reads[0]) == set(reads[1]) == set(full)
    whole = ("hc_attn_", "hc_ffn_", "norm.weight", "layernorm.weight", ".gate.weight", "e_score_correction_bias",
             "q_a_proj.weight", "kv_a_proj_with_mqa.weight", ".indexer.", "f_a_proj.weight", "g_a_proj.weight",
             "A_log")
    halved = [n for n in full if not any(w in n for w in whole)]
    assert any(n.endswith("self_attn.q_b_proj.weight") for n in halved)
    assert any(n.endswith("self_attn.q_conv1d.weight") for n in halved)
    for name in full:
        want = full[name] // 2 if name in halved else full[name]
        assert reads[0][name] == reads[1][name] == want, name


@pytest.mark.slow
def test_speculative_decoding_rolls_states_back_past_rejected_drafts(glm53_path):
    """Drafts right with probability 0.7, verified in steps whose queries select pools: the KDA states take only the
    accepted tokens (replay_states) and the latents / indexer rows past them are overwritten, so greedy outputs
    equal transformers'."""
    import functools

    from moelink.benchmarks.spec_decode import OracleDrafter

    ps = _prompts()[:6]
    want = hf_greedy_nocache(glm53_path, ps)
    spec = {"method": "ngram", "num_speculative_tokens": 3,
            "drafter_factory": functools.partial(OracleDrafter, {tuple(p): w for p, w in zip(ps, want)}, 0.7,
                                                 vocab=VOCAB, seed=4)}
    llm = LLM(glm53_path, speculative_config=spec, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48,
              num_kv_blocks=48, block_size=8, num_state_checkpoints=8)
    assert_same(engine_greedy(llm, ps), want, ps)
    sd = llm.engine.stats().spec_decode
    assert sd is not None and sd.num_draft_tokens > 0 and sd.num_accepted_tokens > 0
    assert_pool_free(llm)
