"""Batch-invariant mode end to end (issue 58 item 4; engine/config/batch_invariant.py, kernels/batch_invariant.py):
a target request's tokens and logprobs are bitwise the same alone and in batches of 1-64 mixed requests, across
chunked-prefill boundaries, a prefix-cache hit, an offload-tier hit and preemption; the logprob a decode step reports for a token equals,
bitwise, that token's prompt logprob when the whole sequence is prefilled again (what a trainer recomputes). The same
runs without the mode, under a matmul that splits its reduction by the batch's rows as BLAS libraries do, differ (so
the checks can fail, on any CPU: whether this machine's own BLAS moves these shapes' bits is its kernel choice, not a
property of the engine; issue 82). float32, where the reduction order shows (float64 hides it to ~1e-14 only); GQA
(Qwen3-MoE) and MLA (DeepSeek-V3)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from moelink.engine import LLM, SamplingParams

from tests.helpers.parity import assert_pool_free, prompts

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)

GEN = 6


def _params(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=GEN, ignore_eos=True, logprobs=2, **kw)


def _record(out) -> tuple[list[int], list[float], list[dict]]:
    """(tokens, each sampled token's logprob, each step's top entries as {id: logprob})."""
    c = out.outputs[0]
    return (list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
            [{t: v.logprob for t, v in lp.items()} for lp in c.logprobs])


class _SplitKByRows(TorchFunctionMode):
    """The negative control's matmul: `F.linear` / `matmul` of more than one row sum their reduction in two halves,
    the second first; one row sums it whole. What a BLAS does when it picks a split-K kernel by the problem's shape,
    made certain: the host BLAS alone may or may not move these shapes' bits on a given CPU (an AVX2 machine's MKL
    kept qwen4_exp's logprobs bitwise without the mode), so a control that relied on it failed there."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and not kwargs:
            x, w = args[0], args[1]
            bias = args[2] if func is F.linear and len(args) > 2 else None
            K = x.shape[-1]
            if w.dim() == 2 and x.dim() >= 2 and x.numel() // max(K, 1) > 1 and K >= 2 and x.is_floating_point():
                wt = w.t() if func is F.linear else w
                h = K // 2
                # The mode is off inside its own handler: the halves' products run on the plain ops.
                y = torch.matmul(x[..., h:], wt[h:]) + torch.matmul(x[..., :h], wt[:h])
                return y if bias is None else y + bias
        return func(*args, **kwargs)


def _main_llm(path: str, batch_invariant: bool, max_num_seqs: int) -> LLM:
    return LLM(path, dtype="float32", max_num_seqs=max_num_seqs, max_num_batched_tokens=96, num_kv_blocks=512,
               block_size=8, batch_invariant=batch_invariant)


@pytest.fixture(scope="module")
def invariant_llms():
    """invariant_llms(path) -> the batch-invariant engine of _runs' first conditions for that checkpoint, started
    once for the module: the re-prefill test runs on the same engine (its 96-token budget still chunks the
    re-prefilled sequences beside each other), not on one more engine of its own per model."""
    built: dict[str, LLM] = {}

    def get(path: str, max_num_seqs: int) -> LLM:
        if path not in built:
            built[path] = _main_llm(path, True, max_num_seqs)
        assert built[path].engine.config.scheduler.max_num_seqs == max_num_seqs
        return built[path]

    yield get
    for llm in built.values():
        llm.shutdown()


def _runs(path: str, batch_invariant: bool, target: list[int], others: list[list[int]],
          sizes: tuple[int, ...] = (4, 16, 64), full: bool = True, llm: LLM | None = None) -> list[tuple]:
    """The target's record in each condition: alone; in batches of `sizes` at different places; chunked at other
    boundaries (a smaller token budget); after its first 40 tokens were cached by another request; with speculative
    decoding (n-gram drafts, verify steps); preempted (a KV pool too small for the batch). `full=False`: alone and
    batched only, up to the first batch whose logprobs differ from alone (what shows that the engine without the
    mode differs: one such batch is enough). `llm`: the engine of the first conditions, when the caller holds one
    (kept running), else one started here."""
    records = []
    own = llm is None
    llm = _main_llm(path, batch_invariant, max(sizes)) if llm is None else llm
    try:
        records.append(_record(llm.generate([target], _params(), use_tqdm=False)[0]))
        for size in sizes:
            at = size * 5 // 8
            batch = others[: size - 1]
            batch = batch[:at] + [target] + batch[at:]
            outs = llm.generate(batch, _params(), use_tqdm=False)
            records.append(_record(outs[at]))
            if not full and records[-1][1] != records[0][1]:
                return records
        if not full:
            return records
        llm.flush_cache()
        llm.generate([target[:40] + [7, 7, 7]], _params(), use_tqdm=False)  # the target's first 5 blocks cached
        hit = llm.generate([target] + others[:5], _params(), use_tqdm=False)[0]
        assert hit.num_cached_tokens == 40
        records.append(_record(hit))
        assert_pool_free(llm)
    finally:
        if own:
            llm.shutdown()
    # Speculative decoding: each accepted token's logprob comes from a verify step's rows, beside its drafts.
    spec = LLM(path, dtype="float32", max_num_seqs=16, max_num_batched_tokens=96, num_kv_blocks=256, block_size=8,
               batch_invariant=batch_invariant,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1})
    try:
        repeat = target[:20] * 3  # a prompt that repeats itself: the drafts get accepted
        outs = spec.generate(others[:5] + [target, repeat], _params(), use_tqdm=False)
        assert spec.engine.stats().spec_decode.num_draft_tokens > 0  # verify steps ran (drafts accepted or not)
        records.append(_record(outs[-2]))
    finally:
        spec.shutdown()
    small = LLM(path, dtype="float32", max_num_seqs=16, max_num_batched_tokens=40, num_kv_blocks=26, block_size=8,
                batch_invariant=batch_invariant)
    try:
        # Five requests of 90-odd tokens (12 blocks each with their tokens) cannot all hold 26 blocks, however their
        # chunks interleave: one is preempted and recomputed (asserted below); more of them only preempt more often.
        longest = sorted(others, key=len)[-4:]
        outs = small.generate(longest + [target], _params(), use_tqdm=False)
        assert small.engine.stats().num_preemptions_total > 0
        records.append(_record(outs[-1]))
    finally:
        small.shutdown()
    return records


_KIMI: dict[str, str] = {}


def _path(model, tiny_model, hf_tiny_model, tmp_path_factory) -> str:
    if model == "kimi_linear":  # a drawn preset (tests/helpers/drawn_presets.py), made once per session
        from moelink.engine.models.kimi_linear.tiny import KIMI_LINEAR

        from tests.helpers.drawn_presets import save_preset

        if "path" not in _KIMI:
            _KIMI["path"] = save_preset(tmp_path_factory.mktemp("kimi_linear"), KIMI_LINEAR)
        return _KIMI["path"]
    if model == "minimax_m3":  # block-sparse attention layers beside full attention (its text model)
        from moelink.engine.models.minimax_m3.tiny import MINIMAX_M3

        from tests.helpers.drawn_presets import save_preset

        if "minimax_m3" not in _KIMI:
            _KIMI["minimax_m3"] = save_preset(tmp_path_factory.mktemp("minimax_m3"), MINIMAX_M3)
        return _KIMI["minimax_m3"]
    if model == "glm5_next":  # GLM-5.3-Flash: pooled DSA (kpool positions a pool) beside KDA layers
        from moelink.engine.tools.tiny_model import make_tiny_model

        if "glm5_next" not in _KIMI:
            _KIMI["glm5_next"] = str(make_tiny_model(tmp_path_factory.mktemp("glm5_next") / "m", arch="glm5_next"))
        return _KIMI["glm5_next"]
    if model == "qwen4_exp":  # Qwen3.8-Flash-Next: QSA (indexed GQA over pooled blocks) beside gated DeltaNet
        from moelink.engine.tools.tiny_model import make_tiny_model

        if "qwen4_exp" not in _KIMI:
            # Weights drawn wider than the preset's 0.1: at 0.1 its logits are so flat that a reduction-order change
            # of the hidden states does not reach a logprob's bits (an AVX2 CPU's BLAS, without the mode, gave bitwise
            # equal logprobs; issue 82), and the invariance checks would pass without the mode.
            _KIMI["qwen4_exp"] = str(make_tiny_model(tmp_path_factory.mktemp("qwen4_exp") / "m", arch="qwen4_exp",
                                                     extra={"initializer_range": 0.5}))
        return _KIMI["qwen4_exp"]
    if model == "dsv4":  # DeepSeek-V4 (CSA / HCA compressed attention, hash routing, hyper-connections)
        from tests.helpers.dsv4_checkpoint import save_dsv4_checkpoint

        if "dsv4" not in _KIMI:
            _KIMI["dsv4"] = save_dsv4_checkpoint(tmp_path_factory.mktemp("dsv4"))
        return _KIMI["dsv4"]
    return tiny_model(model) if model == "qwen3_e6k3" else hf_tiny_model(model)


# GQA (Qwen3-MoE), MLA with q LoRA and grouped routing (DeepSeek-V3), gated DeltaNet beside gated attention
# (Qwen3-Next: per-sequence state, its prefix hits resumed from state checkpoints), KDA beside NoPE MLA (Kimi Linear)
# DeepSeek-V3.2 (DSA: the lightning indexer's top-k and sparse MLA; prompts past index_topk, so steps run sparse
# and dense), DeepSeek-V4 (CSA / HCA compressed attention over a window ring and compressed entries, hash-routed
# layers, hyper-connections), MiniMax-M3 (block-sparse attention: an indexer's blocks per head, past 16 positions),
# GLM-5.3-Flash (pooled DSA beside KDA), Qwen3.8-Flash-Next (QSA beside gated DeltaNet)
MODELS = ["qwen3_e6k3", "dsv3_lora", "qwen3_next", "kimi_linear", "dsv32", "dsv4", "minimax_m3", "glm5_next",
          "qwen4_exp"]


def _sizes(model: str) -> tuple[int, ...]:
    """The batch sizes the target runs in: the 64-request batch on the first model; 4 and 16 on the others (the
    same rules, a quarter of the work)."""
    return (4, 16, 64) if model == MODELS[0] else (4, 16)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_a_request_gets_the_same_bits_in_any_batch_and_not_without_the_mode(model, tiny_model, hf_tiny_model,
                                                                          tmp_path_factory, invariant_llms):
    path = _path(model, tiny_model, hf_tiny_model, tmp_path_factory)
    ps = prompts(128, seed=51, n=64, lo=3, hi=90)
    target, others = ps[1], ps[2:] + ps[:1]
    random.Random(5).shuffle(others)
    sizes = _sizes(model)
    on = _runs(path, True, target, others, sizes, llm=invariant_llms(path, max(sizes)))
    assert all(r == on[0] for r in on), [i for i, r in enumerate(on) if r != on[0]]
    # The control's matmul, entered where the engine runs a step's forward (the plain-torch backend's step context,
    # on the stream's thread: torch's function modes are per thread).
    from moelink.kernels.ops import ReferenceKernels

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ReferenceKernels, "step_context", staticmethod(_SplitKByRows), raising=False)
        off = _runs(path, False, target, others, sizes, full=False)
    assert any(r[1] != off[0][1] for r in off), "without the mode the logprobs were bitwise equal as well"
    assert on[0][0] == off[0][0]  # the same tokens: only the last bits moved


@pytest.mark.slow
@pytest.mark.parametrize("arch,fmt", [("gpt_oss", "mxfp4"), ("qwen3_moe", "fp8"), ("deepseek_v3", "int4")])
def test_quantized_weights_give_a_request_the_same_bits_in_any_batch(arch, fmt, tmp_path):
    """The formats' own kernels: MXFP4 experts beside gpt-oss's sinks and sliding layers, FP8 block-scaled linears
    and experts (per-token activation scales), INT4 experts (group-wise, dequantized into the per-expert path)."""
    from moelink.engine.tools.tiny_model import make_tiny_model

    path = str(make_tiny_model(tmp_path / arch, arch=arch, format=fmt))
    ps = prompts(128, seed=53, n=64, lo=3, hi=90)
    target, others = ps[1], ps[2:] + ps[:1]
    on = _runs(path, True, target, others, (16,))
    assert all(r == on[0] for r in on), [i for i, r in enumerate(on) if r != on[0]]


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_decode_logprobs_equal_the_prompt_logprobs_of_a_re_prefill(model, tiny_model, hf_tiny_model, tmp_path_factory,
                                                                   invariant_llms):
    """A trainer's recompute: the sequence prompt + generated tokens prefilled again (in chunks, beside others)
    scores each generated token with exactly the logprob the decode step reported."""
    path = _path(model, tiny_model, hf_tiny_model, tmp_path_factory)
    ps = prompts(128, seed=52, n=8, lo=5, hi=60)
    llm = invariant_llms(path, max(_sizes(model)))
    outs = llm.generate(ps, _params(), use_tqdm=False)
    seqs = [p + list(o.outputs[0].token_ids) for p, o in zip(ps, outs)]
    again = llm.generate(seqs, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    for p, o, a in zip(ps, outs, again):
        tokens, logprobs, _ = _record(o)
        rescored = [a.prompt_logprobs[len(p) + i][t].logprob for i, t in enumerate(tokens)]
        assert rescored == logprobs
    assert_pool_free(llm)


def test_the_mode_is_refused_where_it_has_no_kernels_and_honours_vllm_env(tiny_model, hf_tiny_model, monkeypatch,
                                                                          tmp_path):
    from moelink.engine.config.batch_invariant import ATTENTION_KINDS
    from moelink.kernels.batch_invariant_kernels import supported_attention_kinds

    assert ATTENTION_KINDS == supported_attention_kinds()  # what the engine admits is what the kernels cover
    from moelink.engine.tools.tiny_model import make_tiny_model

    # Every attention kind moelink serves has its invariant kernels now; a kind without them is refused naming it
    # (shown by taking QSA's away).
    from moelink.engine.config import batch_invariant as bi

    qsa = make_tiny_model(tmp_path / "qwen4_exp", arch="qwen4_exp")  # Qwen3.8-Flash-Next: QSA sparse attention
    monkeypatch.setattr(bi, "ATTENTION_KINDS", bi.ATTENTION_KINDS - {"qsa"})
    with pytest.raises(ValueError, match=r"attention kind\(s\) qsa have no batch-invariant kernels"):
        LLM(str(qsa), dtype="float32", num_kv_blocks=32, batch_invariant=True)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="index_cache_dtype='fp8' is not supported with batch_invariant=True"):
        LLM(hf_tiny_model("dsv32"), dtype="float32", num_kv_blocks=32, batch_invariant=True, index_cache_dtype="fp8")
    with pytest.raises(ValueError, match="kernels='triton' is invalid with batch_invariant=True"):
        LLM(tiny_model("qwen3_e6k3"), dtype="float32", num_kv_blocks=32, batch_invariant=True, kernels="triton")
    with pytest.raises(ValueError, match="batch_invariant='yes' is invalid"):
        LLM(tiny_model("qwen3_e6k3"), dtype="float32", num_kv_blocks=32, batch_invariant="yes")
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    llm = LLM(tiny_model("qwen3_e6k3"), dtype="float32", num_kv_blocks=32)
    try:
        assert llm.engine.config.kernels == "batch_invariant"
    finally:
        llm.shutdown()


@pytest.mark.slow  # one engine, a handful of short requests: about 2 s
def test_a_prefix_loaded_back_from_the_offload_tier_gives_the_same_bits(tiny_model):
    """The offload tier's hit (docs/kv-offload.md): the target's blocks, evicted from the device to host memory and
    loaded back, give it the tokens and logprobs it got computing them, alone and beside another request."""
    from moelink.engine.kv_transfer.offload import OffloadConfig, OffloadKVConnector

    target, *others = prompts(200, seed=33, n=4, lo=40, hi=41)  # 40 tokens: 10 blocks of 4
    conn = OffloadKVConnector(OffloadConfig(host_bytes=1 << 30))
    llm = LLM(tiny_model("qwen3_e6k3"), dtype="float32", num_kv_blocks=20, block_size=4, max_num_batched_tokens=64,
              max_model_len=64, batch_invariant=True, kv_connector=conn)
    try:
        computed = llm.generate([target], _params(), use_tqdm=False)[0]
        assert computed.num_cached_tokens == 0
        for p in others:  # each fills the device pool: the target's blocks go to the host tier
            llm.generate([p], _params(), use_tqdm=False)
        loaded = llm.generate([target], _params(), use_tqdm=False)[0]
        assert loaded.num_cached_tokens == 39 and conn.offload_tier_stats()["host"].hits > 0
        for p in others[:2]:
            llm.generate([p], _params(), use_tqdm=False)
        beside = llm.generate([others[2][:9], target], _params(), use_tqdm=False)[1]
        assert beside.num_cached_tokens > 0
        assert _record(loaded) == _record(computed) == _record(beside)
    finally:
        llm.shutdown()



def _walk_block_by_block(q_TNH, k_cache, v_cache, blocks, scale, sinks_N):
    """The online softmax one key block at a time, written out with the kernels' own tiled ops (what walk_blocks
    ran before it batched a group of blocks): the bits walk_blocks must keep."""
    from moelink.kernels.batch_invariant import chunked_exp, fixed_bmm, tiled_amax, tiled_sum

    T, N, H = q_TNH.shape
    K, hv = k_cache.shape[2], v_cache.shape[-1]
    acc = torch.float32
    q_XRH = q_TNH.to(acc).reshape(T * K, N // K, H)
    m_TN, l_TN = sinks_N.to(acc)[None, :].expand(T, N).clone(), torch.ones(T, N, dtype=acc)
    acc_TNV = torch.zeros(T, N, hv, dtype=acc)
    for slots_TB, seen_TNB in blocks:
        B = slots_TB.shape[1]
        k_TBKH = k_cache.flatten(0, 1).index_select(0, slots_TB.reshape(-1)).to(acc).view(T, B, K, H)
        v_TBKV = v_cache.flatten(0, 1).index_select(0, slots_TB.reshape(-1)).to(acc).view(T, B, K, hv)
        s_TNB = (fixed_bmm(q_XRH, k_TBKH.permute(0, 2, 3, 1).reshape(T * K, H, B).contiguous()) * scale).view(T, N, B)
        s_TNB = s_TNB.masked_fill(~seen_TNB, float("-inf"))
        m_new_TN = torch.maximum(m_TN, tiled_amax(s_TNB, -1))
        shift_TN = torch.where(torch.isinf(m_new_TN), torch.zeros_like(m_new_TN), m_new_TN)
        p_TNB = chunked_exp(s_TNB - shift_TN[..., None])
        alpha_TN = chunked_exp(m_TN - shift_TN)
        l_TN = l_TN * alpha_TN + tiled_sum(p_TNB, -1)
        pv_TNV = fixed_bmm(p_TNB.view(T * K, N // K, B), v_TBKV.permute(0, 2, 1, 3).reshape(T * K, B, hv).contiguous())
        acc_TNV = acc_TNV * alpha_TN[..., None] + pv_TNV.view(T, N, hv)
        m_TN = m_new_TN
    return (acc_TNV / l_TN[..., None]).to(q_TNH.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_grouped_walk_gives_the_bits_of_a_block_at_a_time(dtype, monkeypatch):
    """walk_blocks batches a group of key blocks' products, maxima, exponentials and sums (kernels/
    batch_invariant_kernels.py): the result is bitwise the walk one block at a time, with sinks, a per-head selection,
    a block no row sees and groups cut mid-walk, whatever the group size."""
    from moelink.kernels import batch_invariant_kernels as bik

    g = torch.Generator().manual_seed(3)
    T, N, K, H, B, J = 9, 4, 2, 16, 8, 7
    k_cache, v_cache = (torch.randn(20, B, K, H, generator=g).to(dtype) for _ in range(2))
    q_TNH, sinks_N = torch.randn(T, N, H, generator=g).to(dtype), torch.randn(N, generator=g).to(dtype)
    blocks = [(torch.randint(0, 20 * B, (T, B), generator=g), torch.rand(T, N, B, generator=g) < 0.5) for _ in range(J)]
    blocks[0][1][:] = False
    outs = [_walk_block_by_block(q_TNH, k_cache, v_cache, blocks, 0.25, sinks_N)]
    for slots in (1, T * B * 3, 1 << 15):  # one block a group, groups of 3 (cut mid-walk), all at once
        monkeypatch.setattr(bik, "WALK_GROUP_SLOTS", slots)
        outs.append(bik.walk_blocks(q_TNH, k_cache, v_cache, iter(blocks), 0.25, sinks_N, 1.0, 1.0, None))
    assert all(torch.equal(o.view(torch.int16) if dtype == torch.bfloat16 else o.view(torch.int32),
                           outs[0].view(torch.int16) if dtype == torch.bfloat16 else outs[0].view(torch.int32))
               for o in outs[1:])
