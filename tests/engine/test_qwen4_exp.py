"""Qwen3.8-Flash-Next (transformers' qwen4_exp, served from its multimodal checkpoint Qwen4ExpForConditionalGeneration:
the text model under model.language_model.) against transformers 5.24's own model: config reading and its refusals,
the n-gram table's hashing constants against transformers', and greedy parity with transformers' `generate` in
float64, token for token: 1-150-token prompts alone, together under a small token budget (chunked prefill, batches),
under a pool small enough to preempt and then again from the state checkpoints (gated DeltaNet's and the PLE's
states, QSA's K/V and index keys: prefix-cache hits), shared-prefix hits, and prefill/decode over TCP. The tiny model
(engine/models/qwen4_exp/tiny.py) has QSA blocks of 4 and a budget of 8, so the prompts cross many blocks, and its
vocabulary holds the eos token, which restarts the n-grams. Checkpoints: tests/helpers/qwen4_exp_checkpoints.py."""
from __future__ import annotations

import math

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config import kv_sizing
from moelink.engine.config.model import ModelConfig

from tests.helpers.config_dirs import config_dir
from tests.helpers.parity import (assert_same, check_chunked_batched, check_preemption_then_prefix_hits,
                                  check_prefix_cache_parity, engine_greedy, hf_greedy, prompts)
from tests.helpers.qwen4_exp_checkpoints import EOS, VOCAB, qwen4_exp_config, save_qwen4_exp_checkpoint

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def q38_path(tmp_path_factory) -> str:
    return save_qwen4_exp_checkpoint(tmp_path_factory.mktemp("qwen4_exp"))


def _set_text(**fields):
    return lambda raw: raw["text_config"].update(fields)


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    return config_dir(tmp_path, qwen4_exp_config(**overrides), edit)


# -- config ---------------------------------------------------------------------------------------------------

def test_config(tmp_path):
    """The text model of the multimodal config: QSA on layers 2 and 4, gated DeltaNet elsewhere, PLE tables on
    layers 0 and 3 (1-indexed 1 and 4), 3 gated residual streams, every layer MoE with a gated shared expert."""
    from moelink.engine.models.qwen4_exp.reader import IndexedGQAConfig, PLELinearConfig

    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    assert cfg.architecture == "Qwen4ExpForCausalLM"
    a = cfg.attention
    assert isinstance(a, IndexedGQAConfig) and a.kind == "qsa" and a.output_gate and a.qk_norm == "per_head"
    assert (a.indexer.num_heads, a.indexer.head_dim, a.indexer.budget, a.indexer.compress_ratio) == (8, 16, 8, 4)
    assert a.rope.rotary_dim == 8
    kinds = [type(x).__name__ for x in cfg.layer_attention]
    assert kinds == ["PLELinearConfig", "PLELinearConfig", "IndexedGQAConfig", "PLELinearConfig", "IndexedGQAConfig"]
    ples = [x.ple for x in cfg.layer_attention if isinstance(x, PLELinearConfig)]
    assert [p is not None for p in ples] == [True, False, True]
    assert [p.ngram.table_index for p in ples if p is not None] == [0, 1]
    assert cfg.state_layers == (0, 1, 3) and cfg.sparse_layers == tuple(range(5))
    hc = cfg.hyper_connections
    assert (hc.mixing, hc.hc_mult, hc.lowrank) == ("gated", 3, 8)
    assert cfg.moe.shared_expert_gate and cfg.norm_weight_offset == 1.0
    # Per QSA layer and token: K and V (2 kv heads of 16 each), a 16-value raw index key and a 16-value row of block
    # keys (written by a block's last token); float32 (the config's dtype, unset).
    assert kv_sizing.kv_cache_bytes_per_token(cfg) == 2 * (2 * 2 * 16 + 16 + 16) * 4
    # The PLE layers' states: gated DeltaNet's, then the conv rows ((4 - 1) * 3 of 3 * 32) and 2 context ids.
    plain, ple = cfg.layer_attention[1], cfg.layer_attention[0]
    assert ple.state_bytes_per_sequence(torch.float32) - plain.state_bytes_per_sequence(torch.float32) == (
        9 * 96 * 4 + 2 * 8)


@pytest.mark.slow  # transformers' qwen4_exp modeling module imports in ~5 s
def test_ngram_constants_match_transformers():
    """The heads' prime vocabularies, offsets and multipliers equal transformers' Qwen4ExpTextNGramEmbedding's for
    every table of a model (the primes numbered across tables)."""
    from transformers.models.qwen4_exp.modeling_qwen4_exp import Qwen4ExpTextNGramEmbedding

    from moelink.engine.models.ngram_embedding_config import NGramEmbeddingConfig

    text = qwen4_exp_config(ple_layer_ids=[1, 2, 4], ngram_size=4, heads_per_ngram=3, ple_embed_dim=18).text_config
    for table in range(3):
        hf = Qwen4ExpTextNGramEmbedding(text, 18, layer_idx=0, ple_layer_index=table)
        ours = NGramEmbeddingConfig(VOCAB, 4, 3, 18, 61, 8, 1234, EOS, table)
        assert list(ours.head_vocab_sizes) == hf.head_vocab_sizes
        assert list(ours.head_offsets) == hf.head_offsets
        assert list(ours.multipliers()) == hf.layer_multipliers.tolist()
        assert ours.rows == hf.ngram_embedding.weight.shape[0] and ours.head_dim == hf.ngram_embedding.weight.shape[1]


def test_an_image_request_is_refused_naming_the_missing_tower(tmp_path):
    """The checkpoint is multimodal: moelink serves its text model (model.language_model.*) and refuses images,
    audio and video naming what it runs (images are another issue)."""
    from types import SimpleNamespace

    from moelink.engine.server.serving import Serving

    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    assert cfg.text_weights_prefix == "model.language_model."
    reason = Serving.text_only_reason(SimpleNamespace(model=cfg))
    assert "vision tower is not loaded" in reason and "Qwen4ExpForCausalLM" in reason


@pytest.mark.parametrize("edit,match", [
    (_set_text(layer_types=["linear_attention"] * 5), r"layer_types=.* at least one 'indexed_attention' layer"),
    # transformers' own validation refuses these first (its message, through moelink's "could not read config.json").
    (_set_text(ple_layer_ids=[3]), r"PLE is only supported on linear_attention layers, got PLE on layers \[3\]"),
    (_set_text(indexer_kv_heads=2), r"QSA requires indexer_kv_heads=1"),
    (_set_text(indexer_budget=6), r"indexer_budget must be divisible by indexer_compress_ratio"),
    (_set_text(hc_lowrank=0), r"hc_lowrank=0 is not supported"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit))


@pytest.mark.slow  # an engine start up to the model's build
def test_an_fp8_kv_cache_is_refused_naming_the_qsa_layers(q38_path):
    with pytest.raises(ValueError, match=r"kv_cache_dtype=.* is not supported for Qwen4ExpForCausalLM: its QSA layers"):
        LLM(q38_path, dtype="float32", num_kv_blocks=16, block_size=8, kv_cache_dtype="fp8")


def test_ngram_config_refusals():
    from moelink.engine.models.ngram_embedding_config import NGramEmbeddingConfig

    with pytest.raises(ValueError, match=r"ple_embed_dim=10 is not supported: .*multiple of the n-gram heads"):
        NGramEmbeddingConfig(VOCAB, 3, 2, 10, 61, 8, 1, EOS, 0)
    with pytest.raises(ValueError, match=r"placement='disk' is invalid: allowed: device, host"):
        NGramEmbeddingConfig(VOCAB, 3, 2, 16, 61, 8, 1, EOS, 0, placement="disk")
    with pytest.raises(ValueError, match=r"eos_token_id=None is not supported"):
        NGramEmbeddingConfig(VOCAB, 3, 2, 16, 61, 8, 1, None, 0)  # type: ignore[arg-type]


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=71, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_single_requests(q38_path):
    """One request at a time (no batching), the prompts holding the eos token too."""
    ps = _prompts()[:6]
    assert any(EOS in p for p in ps), "no prompt holds the eos token: the n-gram restart is not exercised"
    with LLM(q38_path, dtype="float64", max_num_seqs=1, num_kv_blocks=64, block_size=8) as llm:
        got = engine_greedy(llm, ps)
    assert_same(got, hf_greedy(q38_path, ps), ps)


@pytest.mark.slow
def test_greedy_parity_with_a_sigmoid_output_gate(tmp_path):
    """output_gate_type "sigmoid": gated DeltaNet's normed heads times sigmoid(z) (GatedRMSNorm's activation)."""
    path = save_qwen4_exp_checkpoint(tmp_path, output_gate_type="sigmoid")
    assert ModelConfig.from_pretrained(path).attention_for(0).output_gate_act == "sigmoid"
    ps = prompts(VOCAB, seed=5, n=3, lo=1, hi=60)
    with LLM(path, dtype="float64", max_num_seqs=3, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8) as llm:
        got = engine_greedy(llm, ps)
    assert_same(got, hf_greedy(path, ps), ps)


@pytest.mark.slow
def test_a_text_only_checkpoint_runs_too(tmp_path):
    """Qwen4ExpForCausalLM as transformers saves it alone (model.*, model_type qwen4_exp_text): the same tokens."""
    from moelink.engine.models.qwen4_exp.tiny import PRESET, tiny_model
    from moelink.engine.tools.tiny_families import preset_config, save_model

    fields = {k: v for k, v in PRESET[2].items() if k != "vision_config"}
    cfg = preset_config(("Qwen4ExpTextConfig", "Qwen4ExpForCausalLM", fields))
    path = save_model(tiny_model(cfg, 0), tmp_path, cfg)
    assert ModelConfig.from_pretrained(path).text_weights_prefix == ""
    ps = prompts(VOCAB, seed=9, n=3, lo=1, hi=60)
    with LLM(path, dtype="float64", max_num_seqs=3, num_kv_blocks=64, block_size=8) as llm:
        got = engine_greedy(llm, ps)
    assert_same(got, hf_greedy(path, ps), ps)


@pytest.mark.slow
def test_speculative_decoding_rolls_the_states_back_past_rejected_drafts(q38_path):
    """Drafts right with probability 0.7: the verifying sequences' gated DeltaNet states and PLE states (conv rows,
    n-gram context: their layers' StateHook) take only their accepted tokens, QSA reads the verified rows' K/V and
    index keys; greedy outputs equal transformers'."""
    import functools

    from moelink.benchmarks.spec_decode import OracleDrafter

    from tests.helpers.parity import assert_pool_free

    ps = _prompts()[:6]
    want = hf_greedy(q38_path, ps)
    spec = {"method": "ngram", "num_speculative_tokens": 3,
            "drafter_factory": functools.partial(OracleDrafter, {tuple(p): w for p, w in zip(ps, want)}, 0.7,
                                                 vocab=VOCAB, seed=4)}
    llm = LLM(q38_path, speculative_config=spec, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48,
              num_kv_blocks=96, block_size=8, num_state_checkpoints=8)
    assert_same(engine_greedy(llm, ps), want, ps)
    sd = llm.engine.stats().spec_decode
    assert sd is not None and sd.num_draft_tokens > 0 and sd.num_accepted_tokens > sd.num_draft_tokens // 3
    assert sd.num_accepted_tokens < sd.num_draft_tokens  # some drafts rejected: the rollback is exercised
    assert_pool_free(llm)


@pytest.mark.slow
def test_greedy_parity_chunked_batched(q38_path):
    check_chunked_batched(q38_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption_and_prefix_hits(q38_path):
    """Preempted sequences recompute; the second pass resumes from state checkpoints (gated DeltaNet's, the PLE
    conv rows and n-gram context) with QSA's K/V and index keys from the cached blocks."""
    check_preemption_then_prefix_hits(q38_path, _prompts())


@pytest.mark.slow
def test_prefix_cache_hit_parity(q38_path):
    check_prefix_cache_parity(LLM, q38_path, VOCAB, n=3, max_suffix=5)


@pytest.mark.slow
def test_pd_transfer_equals_one_engine(q38_path):
    """A prefill engine saves each prompt's K/V and index keys and its states, a decode engine loads them over TCP:
    the decode side's tokens equal one engine's, both pools end free."""
    from tests.helpers.kv_disagg import check_pd_transfer

    check_pd_transfer(q38_path, prompts(VOCAB, seed=47, n=4, lo=2, hi=40))


@pytest.mark.slow
def test_an_offloaded_prefix_loads_back_with_its_states_and_index_keys(q38_path):
    """The KV offload host tier (engine/kv_transfer/offload.py): a 40-token prompt's blocks (K, V and QSA's index
    keys) and its state checkpoint (gated DeltaNet's, the PLE's conv rows and int64 n-gram context) go to the host
    as three other prompts evict them; the prompt again loads them back, resumes past its cached prefix, and decodes
    transformers' tokens."""
    from moelink.engine import SamplingParams
    from moelink.engine.kv_transfer.offload import OffloadConfig, OffloadKVConnector

    target, *others = prompts(VOCAB, seed=61, n=4, lo=40, hi=41)
    conn = OffloadKVConnector(OffloadConfig(host_bytes=1 << 30))
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    with LLM(q38_path, kv_connector=conn, dtype="float64", num_kv_blocks=24, block_size=4,
             max_num_batched_tokens=64, max_model_len=64, skip_warmup=True) as llm:
        runs = [llm.generate([p], params, use_tqdm=False)[0] for p in [target, *others, target]]
    assert runs[0].num_cached_tokens == 0 and runs[-1].num_cached_tokens > 0
    assert conn._sides[0].states.stats["host"].hits == 1
    want = hf_greedy(q38_path, [target], max_new=3)[0]
    assert runs[0].outputs[0].token_ids == want and runs[-1].outputs[0].token_ids == want


@pytest.mark.slow
def test_each_tp_rank_reads_its_columns_of_the_ngram_tables(q38_path):
    """Under TP 2 (loading only, no process group) every checkpoint tensor is read by some rank; each n-gram table
    shard half by each rank (its columns: transformers' embedding_colwise), the hyper-connections and the PLE's
    other weights whole, QSA's q_proj halved (its heads)."""
    from safetensors import safe_open

    from moelink.engine.config.checkpoint_headers import text_model_name
    from moelink.engine.rank.loader import checkpoint_index, load_model
    from moelink.kernels.ops import ReferenceKernels

    class LoadOnlyTP:
        def __init__(self, rank: int, size: int):
            self.rank, self.size = rank, size

        def shard(self, n: int) -> tuple[int, int]:
            per = n // self.size
            return self.rank * per, (self.rank + 1) * per

    cfg = ModelConfig.from_pretrained(q38_path, "float64")
    full = {}
    for real, f in checkpoint_index(q38_path).items():
        name = text_model_name(real, cfg.text_weights_prefix)
        if name is not None:
            with safe_open(str(f), framework="pt") as st:
                full[name] = st.get_slice(real).get_shape()
    reads = []
    for rank in range(2):
        got: dict[str, int] = {}
        load_model(cfg, ReferenceKernels(), torch.device("cpu"), tp=LoadOnlyTP(rank, 2), read_bytes=got)
        reads.append(got)
    size = {n: 8 * math.prod(s) for n, s in full.items()}
    tables = [n for n in full if ".ngram_embedding.shard_" in n]
    assert len(tables) == 4 and all(r[n] == size[n] // 2 for n in tables for r in reads)
    whole = [n for n in full if "hyper_connection" in n or ".ple.key_proj" in n or ".ple.conv1d" in n]
    assert whole and all(r[n] == size[n] for n in whole for r in reads)
    assert all(r[n] == size[n] // 2 for n in full if n.endswith("self_attn.q_proj.weight") for r in reads)
