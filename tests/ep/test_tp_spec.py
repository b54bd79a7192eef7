"""Speculative decoding under tensor parallelism (Ray, CPU ranks, gloo, float64): every rank of a TP group drafts
(engine/spec/proposer/__init__.py), the verify step's emitted tokens and counts are the group's first rank's
(engine/spec/verify.py), and greedy outputs equal one rank's without speculation:
- host drafts (a drafter_factory of known acceptance, benchmarks/spec_decode.OracleDrafter: drafts accepted and
  rejected) on Qwen3-MoE at `-tp 2`;
- the checkpoint's MTP layer (method "mtp", a "bigram" MTP layer that guesses the main model's next token:
  tests/helpers/mtp_checkpoints.bigram_mtp) split over the group like a main layer, drafting what one rank's
  drafts (as many accepted): DeepSeek-V3 (MLA) at `-tp 2` (experts split), `-tp 2 -ep 2` (experts in EP, token
  slices) and `-tp 2 -ep 4` (two TP groups: a group without rows runs the layer's collectives alone), GLM-4-MoE
  (GQA: the MTP cache holds the rank's kv heads) at `-tp 2`; seeded sampling with MTP drafts at `-tp 2` equals
  one rank's; each rank reads only its shard of the layer;
- an EAGLE-3 head, replicated on every rank (the target's embedding gathered whole for it), on Qwen3-MoE at
  `-tp 2`, drafting what it drafts on one rank;
- unseeded random sampling with host drafts at `-tp 2`: both ranks of the group hold the same tokens after every
  verify step (each rank's host drafter records the request states it sees), though each rank's own draws differ;
- DeepSeek-V3.2's MTP layer (a DSA layer with its own indexer) at `-tp 2`; Qwen3-Next with host drafts at `-tp 2`
  (the linear-attention states rolled back by the broadcast accepted counts) and with its own MTP module (split
  like a main layer);
- LongCat-Flash's, Ling hybrid's, Hy4's and GLM-5.3-Flash's own MTP modules (engine/models/normed_mtp.py) at
  `-tp 2` and at `-ep 2`, one engine per layout: greedy equals one rank's without drafts, drafted and accepted as on
  one rank; each rank reads its shard of the module (at `-tp 2 -ep 2` the routed experts by EP rank);
- DeepSeek-V4's and DeepSeek-V4.1's bundled DSpark stages at `-tp 2` and `-ep 2`, drafted and accepted as on one
  rank.
Lean: 4 prompts of 2-24 tokens, 6 new tokens (several verify steps per request)."""
from __future__ import annotations

import functools
import json
import math
import random

import pytest
import torch

from moelink.benchmarks.spec_decode import OracleDrafter
from moelink.engine import LLM, SamplingParams

from tests.helpers.recording_drafter import RecordingDrafter

N_PROMPTS, NEW = 4, 6
KW = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=64, block_size=8)
PARAMS = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, detokenize=False)
# Every draft verified (no adaptive draft length), so the drafts verified and accepted compare across runs.
MTP_SPEC = {"method": "mtp", "num_speculative_tokens": 2, "min_draft_acceptance": 0, "max_verify_fraction": 1}


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 24))] for _ in range(N_PROMPTS)]


def _one_rank(path: str, prompts) -> list[list[int]]:
    """One rank's greedy tokens without speculation: the oracle."""
    with LLM(path, **KW) as one:
        return [o.outputs[0].token_ids for o in one.generate(prompts, PARAMS, use_tqdm=False)]


def _assert_tp_equals(path: str, prompts, want, spec: dict, tp: int = 2, ep: int = 1):
    """`-tp tp -ep ep` with `spec` gives `want`; returns the group's speculative stats (drafts were verified)."""
    with LLM(path, tensor_parallel_size=tp, expert_parallel_size=ep, speculative_config=spec, **KW) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False)]
        stats = llm.engine.rank_stats()
        assert all(s.num_free_blocks == s.num_total_blocks for s in stats)
        sd = llm.engine.stats().spec_decode  # every TP group's (scheduler's) together
    assert got == want
    assert sd is not None and sd.num_draft_tokens > 0
    return sd


def _one_rank_drafts(path: str, prompts, spec: dict) -> tuple[int, int]:
    """(drafts verified, drafts accepted) of one rank drafting with `spec`."""
    with LLM(path, speculative_config=spec, **KW) as one:
        one.generate(prompts, PARAMS, use_tqdm=False)
        sd = one.engine.stats().spec_decode
    return sd.num_draft_tokens, sd.num_accepted_tokens


def _assert_drafts_as_one_rank(path: str, prompts, want, spec: dict, one_rank: tuple[int, int], ep: int = 1,
                               tp: int = 2):
    """A device drafter at `-tp tp -ep ep`: `want`, and it drafted and accepted as on one rank (float64: the split
    layer's drafts are the whole one's), some drafts accepted."""
    sd = _assert_tp_equals(path, prompts, want, spec, tp=tp, ep=ep)
    assert sd.num_accepted_tokens > 0
    assert (sd.num_draft_tokens, sd.num_accepted_tokens) == one_rank


def test_tp2_host_drafts_equal_one_rank(local_ray, tiny_model, tmp_path):
    """Greedy with drafts accepted and rejected equals one rank without; then unseeded sampling at temperature 1,
    where the acceptance test's uniforms and the recovered / bonus tokens are each rank's own draws, so only the
    group's first rank's tokens, broadcast, keep the two ranks' request states equal (each rank's drafter records
    the states it is asked about)."""
    path = tiny_model("qwen3_e6k3")
    vocab = 512
    ps = _prompts(vocab, seed=11)
    want = _one_rank(path, ps)
    ref = {tuple(p): w for p, w in zip(ps, want)}
    oracle = functools.partial(OracleDrafter, ref, 0.6, vocab, 5)
    spec = {"method": "ngram", "num_speculative_tokens": 2, "min_draft_acceptance": 0, "max_verify_fraction": 1,
            "drafter_factory": functools.partial(RecordingDrafter, str(tmp_path), oracle)}
    sampled = SamplingParams(temperature=1.0, max_tokens=NEW, ignore_eos=True, detokenize=False)
    with LLM(path, tensor_parallel_size=2, speculative_config=spec, **KW) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(ps, PARAMS, use_tqdm=False)] == want
        sd = llm.engine.stats().spec_decode
        assert 0 < sd.num_accepted_tokens < sd.num_draft_tokens  # accepted and rejected drafts both verified
        for f in tmp_path.glob("*.jsonl"):  # the sampled run's records only
            f.unlink()
        got = [o.outputs[0].token_ids for o in llm.generate(ps, sampled, use_tqdm=False)]
        assert llm.engine.stats().spec_decode.num_draft_tokens > sd.num_draft_tokens  # drafts verified again
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    seen = [f.read_text().splitlines() for f in sorted(tmp_path.glob("*.jsonl"))]
    assert len(seen) == 2 and seen[0] and seen[0] == seen[1]  # the two ranks' request states, step by step
    # What the ranks hold is what the engine returned: each request's last recorded tokens are its prompt and the
    # start of its output.
    outs = {tuple(p): g for p, g in zip(ps, got)}
    for toks in {rid: toks for rid, toks in map(json.loads, seen[0])}.values():
        prompt = next(p for p in ps if toks[: len(p)] == p)
        assert toks[len(prompt):] == outs[tuple(prompt)][: len(toks) - len(prompt)]


@pytest.fixture(scope="module")
def mtp_paths(tmp_path_factory):
    """Bigram MTP checkpoints (one per family, made once for the module) and each one's one-rank reference. The 2026
    families' (tests/helpers/family_mtp_checkpoints.py) keep their module's own attention and MLP at 0.1 (the
    bigram's `mtp_scale`), so a wrong shard of them changes drafts."""
    from tests.helpers.family_mtp_checkpoints import (bigram_glm5_next_mtp, bigram_hy_v4_mtp, bigram_ling_mtp,
                                                      bigram_longcat_mtp, make_family_mtp)
    from tests.helpers.mtp_checkpoints import bigram_mtp, make_mtp_model

    out: dict[str, tuple[str, list, list, tuple[int, int]]] = {}
    families = {"longcat_flash": bigram_longcat_mtp, "bailing_hybrid": bigram_ling_mtp, "hy_v4": bigram_hy_v4_mtp,
                "glm5_next": bigram_glm5_next_mtp}

    def get(arch: str):
        if arch not in out:
            root = tmp_path_factory.mktemp(f"mtp_{arch}")
            if arch in families:
                path = str(families[arch](make_family_mtp(root / "ckpt", arch), root / "bigram", mtp_scale=0.1))
            else:
                path = str(bigram_mtp(make_mtp_model(root / "ckpt", arch), root / "bigram"))
            ps = _prompts(320, seed=3)
            out[arch] = (path, ps, _one_rank(path, ps), _one_rank_drafts(path, ps, MTP_SPEC))
        return out[arch]
    return get


@pytest.mark.parametrize("arch,ep", [("deepseek_v3", 1), ("deepseek_v3", 2), ("deepseek_v3", 4), ("glm4_moe", 1)])
def test_tp2_mtp_drafts_equal_one_rank(local_ray, mtp_paths, arch, ep):
    path, ps, want, one_rank_drafts = mtp_paths(arch)
    _assert_drafts_as_one_rank(path, ps, want, MTP_SPEC, one_rank_drafts, ep=ep)


# The 2026 families' own modules (engine/models/normed_mtp.py), one engine per layout: at -tp 2 the module's MLA (Ling's
# with its per-head output gate) and MLP split like a main layer's, its embedding / head vocab shards; at -ep 2 each
# rank drafts for its own requests, Ling's routed experts dispatched over the EP group beside the main layers' (a rank
# without rows joins the dispatch alone), its KDA states rolled back per rank. LongCat's module is dense (no experts).
# Hy4's and GLM-5.3-Flash's: their MLA (Hy4's sinks and output gate) split by heads, their own DSA indexer whole on
# every rank, routed and shared experts as Ling's. A module built whole on every rank drafts the same (the read test
# below catches it); one whose vocab shard ignores TP fails here, and so does a rank without rows that skips the
# module's dispatch (GLM-5.3's -ep 2 run has such a step; Hy4's prompts keep both ranks drafting).
@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)])
@pytest.mark.parametrize("arch", ["longcat_flash", "bailing_hybrid", "hy_v4", "glm5_next"])
def test_family_mtp_drafts_at_tp2_and_ep2_equal_one_rank(local_ray, mtp_paths, arch, tp, ep):
    path, ps, want, one_rank_drafts = mtp_paths(arch)
    _assert_drafts_as_one_rank(path, ps, want, MTP_SPEC, one_rank_drafts, tp=tp, ep=ep)


def test_tp2_mtp_seeded_sampling_equals_one_rank(local_ray, mtp_paths):
    """Seeded sampling at temperature 0.8 with MTP drafts: the acceptance test's uniforms and the recovered / bonus
    tokens come from each request's generator, on the group's first rank as on one rank, over the same logits
    (float64), so the sampled tokens equal one rank's with drafts (the rejection-sampling path under TP)."""
    path, ps, _, _ = mtp_paths("deepseek_v3")
    params = [SamplingParams(temperature=0.8, seed=100 + i, max_tokens=NEW, ignore_eos=True, detokenize=False)
              for i in range(len(ps))]
    runs = []
    for tp in (1, 2):
        with LLM(path, tensor_parallel_size=tp, speculative_config=MTP_SPEC, **KW) as llm:
            runs.append([o.outputs[0].token_ids for o in llm.generate(ps, params, use_tqdm=False)])
            assert llm.engine.stats().spec_decode.num_draft_tokens > 0
    assert runs[1] == runs[0]


class _LoadOnlyTP:
    """A TP rank's place without a process group: loading runs no collective (as tests/engine/test_tp_shards.py)."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size


# The MTP layer's tensors read whole by each TP rank: norms, the router and its correction bias, MLA's
# a-projections (the latent is every head's), eh_proj (replicated: engine/spec/heads/mtp.py says why).
MTP_WHOLE = ("norm.weight", "layernorm.weight", ".gate.weight", "e_score_correction_bias", "q_a_proj.weight",
             "kv_a_proj_with_mqa.weight", "eh_proj.weight")


@pytest.mark.parametrize("arch", ["deepseek_v3", "glm4_moe"])
def test_mtp_layer_each_rank_reads_its_shard(tmp_path, arch):
    """Each of two TP ranks reads half of every split tensor of the MTP layer (attention, experts, shared experts,
    its own embedding and head copies) and all of the replicated ones; the main model's loader reads none of them."""
    from safetensors import safe_open

    from moelink.engine.config.model import ModelConfig
    from moelink.engine.rank.loader import checkpoint_index, load_model
    from moelink.engine.spec.proposer.mtp import load_mtp_layer
    from moelink.kernels.ops import ReferenceKernels

    from tests.helpers.mtp_checkpoints import make_mtp_model

    path = str(make_mtp_model(tmp_path / "ckpt", arch))
    cfg = ModelConfig.from_pretrained(path, "float64")
    prefix = f"model.layers.{cfg.num_layers}."
    full = {}
    for name, f in checkpoint_index(path).items():
        if name.startswith(prefix):
            with safe_open(str(f), framework="pt") as st:
                t = st.get_slice(name)
                full[name] = math.prod(t.get_shape()) * {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}[t.get_dtype()]
    reads, cpu = [], torch.device("cpu")
    for rank in range(2):
        tp, got, main = _LoadOnlyTP(rank, 2), {}, {}
        model = load_model(cfg, ReferenceKernels(), cpu, tp=tp, read_bytes=main)
        assert not any(n.startswith(prefix) for n in main)
        load_mtp_layer(cfg, model, ReferenceKernels(), cpu, tp=tp, read_bytes=got)
        reads.append(got)
    assert set(reads[0]) == set(reads[1]) == set(full), set(full) ^ set(reads[0])
    for name in full:
        share = 1 if name.endswith(MTP_WHOLE) else 2
        assert reads[0][name] == reads[1][name] == full[name] // share, name


def _file_bytes(path: str, names, text_prefix: str = "") -> dict[str, int]:
    """Bytes of each tensor of `names`, named as the model names them (a multimodal checkpoint's `text_prefix`
    stripped: GLM-5.3-Flash's `model.language_model.`)."""
    from safetensors import safe_open

    from moelink.engine.config.checkpoint_headers import text_model_name
    from moelink.engine.rank.loader import checkpoint_index

    out = {}
    for real, f in checkpoint_index(path).items():
        name = text_model_name(real, text_prefix) if text_prefix else real
        if name in names:
            with safe_open(str(f), framework="pt") as st:
                t = st.get_slice(real)
                out[name] = math.prod(t.get_shape()) * {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}[t.get_dtype()]
    return out


def _file_tensor(path: str, name: str) -> torch.Tensor:
    from safetensors import safe_open

    from moelink.engine.rank.loader import checkpoint_index

    with safe_open(str(checkpoint_index(path)[name]), framework="pt") as st:
        return st.get_tensor(name)


# The families' module tensors each TP rank reads whole: norms (LongCat's `enorm.m` / `hnorm.m` too), the router and
# its bias, MLA's a-projections, eh_proj.
FAMILY_MTP_WHOLE = MTP_WHOLE + ("norm.m.weight", "gate.expert_bias")


@pytest.mark.parametrize("arch", ["longcat_flash", "bailing_hybrid", "hy_v4", "glm5_next"])
def test_family_mtp_module_each_rank_reads_its_shard(tmp_path, arch):
    """The 2026 families' modules at -tp 2: each rank reads half of every split tensor (MLA's q_b / kv_b / o_proj,
    Ling's output gate `g_proj` and `dense`, the MLP's or experts' and shared expert's channels, LongCat's own
    embedding rows) and the replicated ones whole; at -tp 2 -ep 2 (Ling's routed experts) each rank reads its
    experts only, whole, and the shared expert whole. The main model's loader reads none of the module's tensors."""
    from moelink.engine.config.model import ModelConfig
    from moelink.engine.rank.loader import SafetensorsCheckpoint, load_model
    from moelink.engine.spec.heads import mtp_checkpoint_names
    from moelink.engine.spec.proposer.mtp import load_mtp_layer
    from moelink.kernels.ops import ReferenceKernels
    from moelink.moe.layer import ExpertParallel
    from moelink.moe.placement import ExpertPlacement

    from moelink.engine.models.hy_v4.mtp import PREFIX

    from tests.helpers.family_mtp_checkpoints import make_family_mtp

    path = str(make_family_mtp(tmp_path / "ckpt", arch))
    cfg = ModelConfig.from_pretrained(path, "float64")
    names = SafetensorsCheckpoint(path, cfg.text_weights_prefix).keys()
    full = _file_bytes(path, set(mtp_checkpoint_names(cfg, names)), cfg.text_weights_prefix)
    assert len(full) > 10
    cpu, k = torch.device("cpu"), ReferenceKernels()
    for ep_size in (1, 2) if arch != "longcat_flash" else (1,):
        reads = []
        for rank in range(2):
            placement = ExpertPlacement(num_experts=cfg.num_experts, ep_size=2)
            ep = ExpertParallel(rank, 2, placement, None, placement.to_tensors(cpu)) if ep_size == 2 else None
            tp, got, main = _LoadOnlyTP(rank, 2), {}, {}
            model = load_model(cfg, k, cpu, ep=ep, tp=tp, read_bytes=main)
            assert not set(main) & set(full)
            mtp = load_mtp_layer(cfg, model, k, cpu, ep=ep, tp=tp, read_bytes=got)
            reads.append(got)
            if ep is not None and arch == "hy_v4":  # a fused tensor's bytes read do not say which rows: the values do
                down_EDI = _file_tensor(path, PREFIX + "mlp.experts.down_proj")[list(ep.local_experts)]
                assert torch.equal(mtp.layer.moe.w2_EDI, down_EDI)
        # Hy4 publishes its experts fused ([E, ...] tensors: `experts.gate_up_proj`), the others one by one.
        fused = [n for n in full if n.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))]
        experts = [n for n in full if ".mlp.experts." in n and n not in fused]
        assert bool(experts or fused) == (arch != "longcat_flash") and bool(fused) == (arch == "hy_v4")
        if ep_size == 2:  # each rank its half of the experts, whole; together every one
            assert not set(reads[0]) & set(reads[1]) & set(experts)
            assert set(reads[0]) | set(reads[1]) == set(full)
            assert all(reads[r][n] == full[n] for r in range(2) for n in experts if n in reads[r])
            # A fused tensor: each rank its experts' rows, every channel (half of it, as under TP, though other half).
            assert all(reads[r][n] == full[n] // 2 for r in range(2) for n in fused)
        else:
            assert set(reads[0]) == set(reads[1]) == set(full), set(full) ^ set(reads[0])
        for name in set(full) - set(experts + fused if ep_size == 2 else ()):
            # Under EP the shared expert is whole on every rank, as a main layer's (tests/engine/test_tp_shards.py).
            whole = (name.endswith(FAMILY_MTP_WHOLE) or ".indexer." in name
                     or (ep_size == 2 and ".shared_experts." in name))
            share = 1 if whole else 2
            assert reads[0][name] == reads[1][name] == full[name] // share, name


def test_tp2_eagle3_drafts_equal_one_rank(local_ray, tiny_model, tmp_path):
    """The head whole on every rank, without an embed_tokens of its own: it reads the target's, gathered whole from
    the ranks' vocab shards at load (engine/spec/proposer/eagle3.py; a head with its own tables runs the same
    replicated path without the gather)."""
    from safetensors.torch import load_file, save_file

    from tests.helpers.eagle3_heads import bigram_head, scaled_target

    path = str(scaled_target(tiny_model("qwen3_e6k3", num_layers=4), tmp_path / "target"))
    head = bigram_head(path, tmp_path / "head", aux_layer_ids=[0, 1, 3])
    files = list(head.glob("*.safetensors"))  # the bigram head's embedding is a copy of the target's: drop it
    assert any("embed_tokens.weight" in load_file(f) for f in files)
    for f in files:
        save_file({n: t for n, t in load_file(f).items() if n != "embed_tokens.weight"}, f)
    ps = _prompts(512, seed=5)
    spec = {"method": "eagle3", "model": str(head), "num_speculative_tokens": 2, "min_draft_acceptance": 0,
            "max_verify_fraction": 1}
    _assert_drafts_as_one_rank(path, ps, _one_rank(path, ps), spec, _one_rank_drafts(path, ps, spec))


def test_tp2_dsa_mtp_drafts_equal_one_rank(local_ray, hf_tiny_model, tmp_path):
    """DeepSeek-V3.2: the MTP layer is a DSA layer too, split like the main ones (heads by rank, its own indexer
    whole on every rank); greedy equals one rank without drafts, drafting and accepting as one rank does."""
    import shutil

    from moelink.engine.tools.tiny_hf_model import add_mtp_layers
    from tests.helpers.hf_checkpoints import VOCAB
    from tests.helpers.mtp_checkpoints import bigram_mtp

    src = tmp_path / "src"
    shutil.copytree(hf_tiny_model("dsv32"), src)
    add_mtp_layers(src)
    path = str(bigram_mtp(src, tmp_path / "bigram", mtp_scale=0.1))
    ps = _prompts(VOCAB, seed=31)
    _assert_drafts_as_one_rank(path, ps, _one_rank(path, ps), MTP_SPEC, _one_rank_drafts(path, ps, MTP_SPEC))


def test_tp2_qwen3_next_mtp_drafts_equal_one_rank(local_ray, hf_tiny_model, tmp_path):
    """Qwen3-Next's own MTP module (engine/spec/heads/qwen_mtp.py: its gated full-attention layer split like a main
    layer, the main model's vocab shards, fc replicated) at -tp 2: the tokens of one rank, drafted and accepted as on
    one rank (bigram module: accepted often), the linear-attention states rolled back by the broadcast counts."""
    from tests.helpers.hf_checkpoints import VOCAB
    from tests.helpers.qwen_mtp_checkpoints import bigram_mtp, with_mtp

    path = str(bigram_mtp(with_mtp(hf_tiny_model("qwen3_next"), tmp_path / "mtp"), tmp_path / "bigram"))
    ps = _prompts(VOCAB, seed=23)
    _assert_drafts_as_one_rank(path, ps, _one_rank(path, ps), MTP_SPEC, _one_rank_drafts(path, ps, MTP_SPEC))


def test_tp2_hybrid_host_drafts_equal_one_rank(local_ray, hf_tiny_model):
    """Qwen3-Next (gated DeltaNet layers split over the group): a verify step rolls each rank's linear-attention
    states back past the rejected drafts by the broadcast accepted counts, so all ranks replay the same tokens."""
    from tests.helpers.hf_checkpoints import VOCAB

    path = hf_tiny_model("qwen3_next")
    ps = _prompts(VOCAB, seed=17)
    want = _one_rank(path, ps)
    ref = {tuple(p): w for p, w in zip(ps, want)}
    spec = {"method": "ngram", "num_speculative_tokens": 2, "min_draft_acceptance": 0, "max_verify_fraction": 1,
            "drafter_factory": functools.partial(OracleDrafter, ref, 0.6, VOCAB, 7)}
    sd = _assert_tp_equals(path, ps, want, spec)
    assert 0 < sd.num_accepted_tokens < sd.num_draft_tokens


def test_tp2_dspark_drafts_equal_one_rank(local_ray, tiny_model, tmp_path):
    """DSpark's DFlash-format stages (engine/spec/proposer/dspark.py), replicated whole on every rank, the target's
    embedding and LM head gathered whole from the ranks' vocab shards at load: a draft constructed to agree with the
    near-bigram target drafts and is accepted as on one rank."""
    from moelink.engine.tools.dspark_checkpoint import agreeing_draft, bigram_target

    path = str(bigram_target(tiny_model("qwen3_e6k3", num_layers=4), tmp_path / "target", scale=0.1))
    draft = agreeing_draft(path, tmp_path / "draft", block_size=3, target_layer_ids=[0, 2], mask_token_id=7)
    ps = _prompts(512, seed=5)
    spec = {"method": "dspark", "model": str(draft), "num_speculative_tokens": 3, "min_draft_acceptance": 0,
            "max_verify_fraction": 1}
    _assert_drafts_as_one_rank(path, ps, _one_rank(path, ps), spec, _one_rank_drafts(path, ps, spec))


@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)])
def test_dsv4_dspark_drafts_at_tp2_and_ep2_equal_one_rank(local_ray, tmp_path, tp, ep):
    """DeepSeek-V4's bundled DSpark stages (engine/models/deepseek_v4/dspark.py), constructed to agree with the
    target: at `-tp 2` each stage splits its heads and experts as the MTP block does, at `-ep 2` its experts
    dispatch like a main layer's (a rank without rows runs the stages' collectives alone); greedy equals one rank's
    without drafts, drafted and accepted as on one rank."""
    from tests.helpers.dsv4_dspark_checkpoint import save_dsv4_with_dspark

    path = save_dsv4_with_dspark(tmp_path / "c", agree=True)
    ps = _prompts(400, seed=7)  # the tiny V4's vocabulary
    spec = {"method": "dspark", "num_speculative_tokens": 3, "min_draft_acceptance": 0, "max_verify_fraction": 1}
    _assert_drafts_as_one_rank(path, ps, _one_rank(path, ps), spec, _one_rank_drafts(path, ps, spec), ep=ep, tp=tp)


@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)])
def test_dsv41_dspark_drafts_at_tp2_and_ep2_equal_one_rank(local_ray, tmp_path, tp, ep):
    """DeepSeek-V4.1's DSpark draft layers (engine/models/deepseek_v41/dspark.py), constructed to agree with the
    target: at `-tp 2` each layer splits its heads, output groups and experts as a main layer does, at `-ep 2` its
    experts (the main layers' count there) dispatch like a main layer's; the verify steps roll the target's rings and
    Engram look-back back on every rank; greedy equals one rank's without drafts, drafted and accepted as on one
    rank."""
    from tests.helpers.dsv41_dspark_checkpoint import save_dsv41_with_dspark

    path = save_dsv41_with_dspark(tmp_path / "c", agree=True, draft_experts=(4, 1) if ep == 1 else (6, 2))
    ps = _prompts(400, seed=7)  # the tiny V4.1's vocabulary
    spec = {"method": "dspark", "num_speculative_tokens": 3, "min_draft_acceptance": 0, "max_verify_fraction": 1}
    _assert_drafts_as_one_rank(path, ps, _one_rank(path, ps), spec, _one_rank_drafts(path, ps, spec), ep=ep, tp=tp)
