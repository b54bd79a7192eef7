"""Speculative decoding with the MTP modules of the 2026 families (method "mtp"), one rank.

LongCat-Flash (engine/models/longcat_flash/mtp.py, layout "longcat"), Ling hybrid (engine/models/bailing_hybrid/
mtp.py, layout "ling"; its main model's KDA states rolled back past rejected drafts), Hunyuan Hy4 (engine/models/
hy_v4/mtp.py, layout "hy_v4") and GLM-5.3-Flash (engine/models/glm5_next/mtp.py, layout "glm5_next"; KDA states rolled
back too): transformers does not run the modules, so the oracle is the engine itself:
- Greedy outputs with MTP drafts are token-identical to decoding without speculation, k = 1 and 2, with chunked
  prefill, batching and preemption in play, on a checkpoint whose module guesses the main model's next token
  (tests.helpers.longcat_mtp_checkpoints.bigram_longcat_mtp): drafts accepted often, rejected too.
- Every draft equals an independent recomputation (tests.helpers.mtp_oracle: the main model and the module run
  from scratch over the whole sequence, float64), on random weights and on the bigram with the module's own
  computation kept.
- Greedy with MTP drafts equals transformers' own greedy (float64), with prefix-cache hits, every block freed
  (LongCat, Ling: Hy4's and GLM-5.3's DeepSeek Sparse Attention is defined by transformers' forward without a cache,
  which tests/engine/test_hy_v4.py and test_glm5_next.py hold the main models to; here their drafts are checked
  against plain decoding and the recomputation).
- The module reads exactly the tensors the tiny preset writes in the published names, and the main model none;
  Hy4's and GLM-5.3's module equals the one composed from transformers' own layer classes (tests/helpers/
  hf_mtp_layer.py), and reads no token embedding at position 0 (vLLM's rule).
- FP8 (LongCat-Flash-Chat-FP8's layout, eh_proj included) and load_format "dummy" run the module too.
- Architecture.mtp_refused (no family sets it now) refuses method "mtp" naming the field and why.
"""
from __future__ import annotations

import random

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.config.arch_spec import Architecture
from moelink.engine.config.model import ModelConfig
from moelink.engine.rank.loader import open_checkpoint
from moelink.engine.models.registry import arch_spec
from moelink.engine.spec.heads import make_mtp_layer, mtp_checkpoint_names
from moelink.engine.spec.proposer import mtp as mtp_proposer
from moelink.engine.tools.tiny_model import make_tiny_model
from moelink.kernels.ops import ReferenceKernels

from tests.helpers.draft_spy import record_drafts
from tests.helpers.family_mtp_checkpoints import (VOCAB, bigram_glm5_next_mtp, bigram_hy_v4_mtp, bigram_ling_mtp,
                                                  bigram_longcat_mtp, make_family_mtp)
from tests.helpers.mtp_oracle import MTPOracle, generate_greedy
from tests.helpers.parity import assert_pool_free, assert_same, engine_greedy, hf_greedy, prompts

# bigram_longcat_mtp's module scale per variant ("random": the tiny preset's module itself).
VARIANTS = {"bigram": 0.0, "bigram_kv": 0.1}


FAMILIES = {"longcat_flash": bigram_longcat_mtp, "bailing_hybrid": bigram_ling_mtp, "hy_v4": bigram_hy_v4_mtp,
            "glm5_next": bigram_glm5_next_mtp}
# The main model's states for the recomputation from transformers (mtp_oracle.py): KDA layers (the engine's need a state
# pool), DeepSeek Sparse Attention (transformers' forward is the definition).
HF_STATES = ("bailing_hybrid", "hy_v4", "glm5_next")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    built: dict = {}

    def get(arch: str, variant: str) -> str:
        if (arch, "random") not in built:
            built[arch, "random"] = make_family_mtp(tmp_path_factory.mktemp(arch) / "ckpt", arch)
        if (arch, variant) not in built:
            built[arch, variant] = FAMILIES[arch](built[arch, "random"], tmp_path_factory.mktemp(arch) / variant,
                                                  mtp_scale=VARIANTS[variant])
        return str(built[arch, variant])

    return get


def _prompts(n: int = 10, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 40))] for _ in range(n)]


def _generate(path: str, spec=None, dtype: str = "float32", max_tokens: int = 16, **kw) -> tuple[list, object]:
    return generate_greedy(path, _prompts(), spec, dtype, max_tokens, **kw)


@pytest.fixture(scope="module")
def plain(checkpoints):
    cache: dict = {}

    def get(arch: str, variant: str, dtype: str = "float32") -> list:
        if (arch, variant, dtype) not in cache:
            cache[arch, variant, dtype] = _generate(checkpoints(arch, variant), dtype=dtype)[0]
        return cache[arch, variant, dtype]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_greedy_with_mtp_drafts_equals_plain_decoding(checkpoints, plain, arch, k):
    got, stats = _generate(checkpoints(arch, "bigram"), {"method": "mtp", "num_speculative_tokens": k})
    assert got == plain(arch, "bigram")
    sd = stats.spec_decode
    assert stats.num_preemptions_total > 0
    assert 0.3 < sd.acceptance_rate < 1.0, sd
    assert sum(sd.accepted_per_position) == sd.num_accepted_tokens
    assert sd.num_verify_rows <= sd.num_draft_tokens <= k * sd.num_verify_rows


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["random", "bigram_kv"])
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_mtp_drafts_equal_the_module_run_over_the_whole_sequence(checkpoints, plain, arch, variant, monkeypatch):
    path, k = checkpoints(arch, variant), 3
    seen = record_drafts(monkeypatch)
    monkeypatch.setattr(mtp_proposer, "_SCRATCH_ROWS", 1)  # the scratch grows mid-run
    got, stats = _generate(path, {"method": "mtp", "num_speculative_tokens": k}, dtype="float64")
    assert got == plain(arch, variant, "float64")
    assert stats.num_preemptions_total > 0 and len(seen) > 30
    if variant == "bigram_kv":
        assert stats.spec_decode.num_accepted_tokens > 0
    oracle = MTPOracle(path, hf_states=arch in HF_STATES)
    wants = oracle.all_drafts([tokens for tokens, _ in seen], k)
    wrong = [(tokens, drafts, want) for (tokens, drafts), want in zip(seen, wants) if drafts != want]
    assert not wrong, f"{len(wrong)} of {len(seen)} drafts differ, e.g. {wrong[0]}"


@pytest.mark.slow
def test_longcat_mtp_reads_the_published_names(checkpoints):
    """The tiny preset's model.mtp.* tensors are exactly the module's plan (vLLM's LongCat MTP names: enorm.m,
    hnorm.m, transformer_layer.mlp, model.mtp.norm), and the main model's loader counts them as MTP tensors."""
    path = checkpoints("longcat_flash", "random")
    cfg = ModelConfig.from_pretrained(path)
    assert cfg.num_nextn_predict_layers == 1
    names = frozenset(open_checkpoint(cfg, "auto", torch.device("cpu")).keys())
    mtp_names = set(mtp_checkpoint_names(cfg, names))
    assert mtp_names == {n for n in names if n.startswith("model.mtp.")}
    assert {"model.mtp.layers.0.enorm.m.weight", "model.mtp.norm.weight", "model.mtp.embed_tokens.weight",
            "model.mtp.layers.0.transformer_layer.mlp.down_proj.weight"} <= mtp_names
    layer = make_mtp_layer(cfg, arch_spec(cfg.architecture), 0, ReferenceKernels(), torch.device("cpu"),
                           None, names, embed_tokens=None, lm_head=torch.zeros(VOCAB, cfg.hidden_size))
    assert set(layer.weight_plan(names)) == mtp_names
    from moelink.engine.models.longcat_flash import mtp, tiny

    assert (tiny.PREFIX, tiny.LAYER) == (mtp.PREFIX, mtp.LAYER)  # the writer's names are the reader's


@pytest.mark.slow
@pytest.mark.parametrize("arch, prefix, unread", [("hy_v4", "model.mtp_layers.0.", "hc_pre."),
                                                  ("glm5_next", "model.layers.6.", "hc_")])
def test_hy_v4_and_glm5_next_mtp_read_the_published_names(checkpoints, arch, prefix, unread):
    """The module's plan is exactly the tensors the tiny checkpoint holds under its published prefix (vLLM's and
    SGLang's names: enorm, hnorm, eh_proj, one decoder layer in a main layer's names, final_layernorm / shared_head.norm),
    none of them a hyper-connection weight; the main model's loader counts them all as MTP tensors."""
    path = checkpoints(arch, "random")
    cfg = ModelConfig.from_pretrained(path)
    assert cfg.num_nextn_predict_layers == 1
    names = frozenset(open_checkpoint(cfg, "auto", torch.device("cpu")).keys())
    mtp_names = set(mtp_checkpoint_names(cfg, names))
    assert mtp_names == {n for n in names if n.startswith(prefix)} and len(mtp_names) > 20
    assert not any(n[len(prefix):].startswith(unread) for n in mtp_names)
    layer = make_mtp_layer(cfg, arch_spec(cfg.architecture), 0, ReferenceKernels(), torch.device("cpu"),
                           None, names, embed_tokens=torch.zeros(VOCAB, cfg.hidden_size),
                           lm_head=torch.zeros(VOCAB, cfg.hidden_size))
    assert set(layer.weight_plan(names)) == mtp_names
    assert layer.layer.self_attn.indexer is not None  # a full indexer of its own, never a shared selection
    from moelink.engine.models.hy_v4 import mtp, tiny

    assert tiny.MTP_PREFIX == mtp.PREFIX  # the writer's names are the reader's
    # vLLM's rule for both modules: the row at position 0 reads no token embedding (its token changes nothing there;
    # at position 1 it does).
    oracle = MTPOracle(path)
    h_TD = torch.randn(2, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a_TD, b_TD = (oracle.mtp(torch.arange(2), torch.tensor(ids), h_TD, oracle._ctx(2)) for ids in ([5, 7], [9, 8]))
    assert torch.equal(a_TD[0], b_TD[0]) and not torch.allclose(a_TD[1], b_TD[1])


@pytest.mark.slow
@pytest.mark.parametrize("arch, template", [("hy_v4", 1), ("glm5_next", 4)])
def test_hy_v4_and_glm5_next_mtp_equal_transformers_layers(checkpoints, arch, template):
    """The module, run from scratch over 30 rows (past index_topk: the indexer selects), equals the one composed from
    transformers' own layer classes holding its tensors (tests/helpers/hf_mtp_layer.py: a main layer of the same
    shape run without hyper-connections, the norms and eh_proj around it), float64: its structure is checked against
    transformers' layers, not against itself (transformers' float32 parts aside)."""
    from tests.helpers.hf_mtp_layer import HFComposedMTP

    path = checkpoints(arch, "random")
    oracle, want = MTPOracle(path), HFComposedMTP(path, template)
    g = torch.Generator().manual_seed(1)
    ids_T = torch.randint(3, VOCAB, (30,), generator=g)
    h_TD = torch.randn(30, oracle.cfg.hidden_size, dtype=torch.float64, generator=g)
    with torch.no_grad():
        got_TD = oracle.mtp(torch.arange(30), ids_T, h_TD, oracle._ctx(30))
    # 1e-4: transformers scores the router in float32 and GLM-5.3's RMSNorms compute in float32 (Glm5NextTextRMSNorm)
    # whatever the model's dtype, off by about 1e-5 here; a wrong structure is off by O(1).
    torch.testing.assert_close(got_TD, want.forward(ids_T, h_TD), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(oracle.mtp.compute_logits(got_TD), want.logits(got_TD), rtol=1e-9, atol=1e-9)


def test_mtp_refused_names_the_field_and_why(monkeypatch):
    """An architecture whose published MTP module moelink cannot build (Architecture.mtp_refused) refuses method "mtp"
    at configuration, naming the field and the reason; the other methods still run."""
    from dataclasses import replace

    from moelink.engine.config import speculative
    from moelink.engine.config.speculative import SpeculativeConfig

    arch = "HYV4ForCausalLM"
    monkeypatch.setitem(speculative.REGISTRY, arch, replace(speculative.REGISTRY[arch], mtp_layers=False,
                                                            mtp_refused="its module is unknown."))
    with pytest.raises(ValueError, match=r"^speculative_config\.method='mtp' is not supported for HYV4ForCausalLM: "
                                         r"its module is unknown\. Use method 'ngram'"):
        SpeculativeConfig(method="mtp", num_speculative_tokens=2).check_model(1, arch)
    SpeculativeConfig(method="ngram", num_speculative_tokens=2, prompt_lookup_max=2).check_model(1, arch)


def test_architecture_mtp_fields_are_validated():
    with pytest.raises(ValueError, match=r"mtp_unstated=-1 is invalid"):
        Architecture("X", None, mtp_unstated=-1)
    with pytest.raises(ValueError, match=r"mtp_refused is set, so mtp_layers must be False"):
        Architecture("X", None, mtp_layers=True, mtp_refused="unknown")


@pytest.mark.slow
def test_longcat_fp8_release_with_its_fp8_eh_proj(checkpoints, tmp_path):
    """LongCat-Flash-Chat-FP8 ships the module's linears in FP8, eh_proj too (with its weight_scale_inv): the module
    reads them so, and greedy with MTP drafts equals greedy without."""
    from safetensors.torch import load_file, save_file

    from moelink.engine.models.longcat_flash.mtp import LAYER
    from moelink.engine.tools.quantize_fp8 import quantize_checkpoint
    from moelink.kernels.fp8 import block_quantize

    path = quantize_checkpoint(checkpoints("longcat_flash", "bigram"), tmp_path / "fp8", block=(16, 16))
    mtp = load_file(path / "mtp.safetensors")
    assert LAYER + "self_attn.q_b_proj.weight_scale_inv" in mtp and LAYER + "eh_proj.weight_scale_inv" not in mtp
    mtp[LAYER + "eh_proj.weight"], mtp[LAYER + "eh_proj.weight_scale_inv"] = block_quantize(
        mtp[LAYER + "eh_proj.weight"], (16, 16))
    save_file(mtp, str(path / "mtp.safetensors"), metadata={"format": "pt"})
    want, _ = _generate(str(path), max_tokens=8)
    got, stats = _generate(str(path), {"method": "mtp", "num_speculative_tokens": 2}, max_tokens=8)
    assert got == want and stats.spec_decode.num_accepted_tokens > 0


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_dummy_weights_run_the_mtp_module(checkpoints, arch):
    path = checkpoints(arch, "random")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, detokenize=False)
    runs = []
    for spec in (None, {"method": "mtp", "num_speculative_tokens": 2}):
        with LLM(path, dtype="float32", max_model_len=256, num_kv_blocks=64, block_size=4, load_format="dummy",
                 speculative_config=spec) as llm:
            outs = llm.generate([{"prompt_token_ids": p} for p in _prompts(4)], params, use_tqdm=False)
            runs.append(([o.outputs[0].token_ids for o in outs], llm.engine.stats().spec_decode))
    assert runs[0][0] == runs[1][0] and runs[1][1].num_draft_tokens > 0


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["longcat_flash", "bailing_hybrid"])
def test_greedy_with_mtp_drafts_equals_transformers_with_prefix_hits(checkpoints, arch):
    """Bigram module, k = 2, prompts of 1-150 tokens in 64-token steps with preemption, then every prompt again
    (prefix-cache hits; Ling's KDA states from state checkpoints): greedy equals transformers' own (float64), and
    every block and state slot comes back."""
    path = checkpoints(arch, "bigram")
    ps = prompts(VOCAB, seed=42, n=10, lo=1, hi=150)
    want = hf_greedy(path, ps)
    with LLM(path, speculative_config={"method": "mtp", "num_speculative_tokens": 2}, dtype="float64",
             max_num_seqs=4, max_num_batched_tokens=64, num_kv_blocks=24, block_size=8, num_state_checkpoints=8) as llm:
        assert_same(engine_greedy(llm, ps), want, ps)
        hits = llm.engine.stats().prefix_cache_hits
        assert_same(engine_greedy(llm, ps), want, ps)
        stats = llm.engine.stats()
        assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits > hits
        assert stats.spec_decode.num_accepted_tokens > 0
        assert_pool_free(llm)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["hy_v4", "glm5_next"])
def test_hy_v4_and_glm5_next_mtp_with_prefix_hits_equal_plain_decoding(checkpoints, plain, arch):
    """The prompts twice on one engine with MTP drafts (k = 2; GLM-5.3's KDA states from state checkpoints the
    second time): both passes equal plain decoding, the second hits the prefix cache, every block and slot comes
    back."""
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, detokenize=False)
    with LLM(checkpoints(arch, "bigram"), dtype="float32", max_model_len=256, max_num_batched_tokens=32,
             num_kv_blocks=64, block_size=4, num_state_checkpoints=10,
             speculative_config={"method": "mtp", "num_speculative_tokens": 2}) as llm:
        for _ in range(2):
            outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], params, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outs] == plain(arch, "bigram")
        stats = llm.engine.stats()
        assert stats.prefix_cache_hits > 0 and stats.spec_decode.num_accepted_tokens > 0
        assert_pool_free(llm)


@pytest.mark.slow
def test_longcat_without_its_mtp_module_is_refused_naming_the_tensor(tmp_path):
    """config.json names no count, so a LongCat checkpoint counts one module (vLLM's rule); one saved without it is
    refused when the drafter loads, naming the first missing tensor."""
    path = make_tiny_model(tmp_path / "plain", "longcat_flash")
    assert ModelConfig.from_pretrained(str(path)).num_nextn_predict_layers == 1
    with pytest.raises(ValueError, match=r"is missing MTP tensor 'model\.mtp\.layers\.0\.eh_proj\.weight' \(and \d+ "
                                         r"more\): speculative method 'mtp' reads the whole MTP layer"):
        LLM(str(path), dtype="float32", max_model_len=128, num_kv_blocks=32, block_size=4,
            speculative_config={"method": "mtp", "num_speculative_tokens": 1})


@pytest.mark.slow
def test_hy_v4_without_its_mtp_module_is_refused_naming_the_tensor(tmp_path):
    """Hy4's config names no count, so a checkpoint counts one module (vLLM's and RTP-LLM's default); one saved
    without it is refused when the drafter loads, naming a missing tensor of model.mtp_layers.0."""
    path = make_tiny_model(tmp_path / "plain", "hy_v4")
    assert ModelConfig.from_pretrained(str(path)).num_nextn_predict_layers == 1
    with pytest.raises(ValueError, match=r"is missing MTP tensor 'model\.mtp_layers\.0\.\S+' \(and \d+ more\): "
                                         r"speculative method 'mtp' reads the whole MTP layer"):
        LLM(str(path), dtype="float32", max_model_len=128, num_kv_blocks=32, block_size=4,
            speculative_config={"method": "mtp", "num_speculative_tokens": 1})
