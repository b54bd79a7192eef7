"""Greedy parity against transformers: the prompts, transformers' `generate` on each prompt alone (float64,
cached per checkpoint and prompt, so a test that re-runs the same prompts, or some of them, under other engine
settings pays for transformers once), the engine's greedy outputs, and the pool-is-free check."""
from __future__ import annotations

import random

import torch

MAX_NEW = 10


def prompts(vocab: int, seed: int, n: int = 16, lo: int = 1, hi: int = 200) -> list[list[int]]:
    """n random prompts; the first is `lo` tokens long and the second `hi`, the rest in between."""
    rng = random.Random(seed)
    lens = [lo, hi] + [rng.randint(lo, hi) for _ in range(n - 2)]
    return [[rng.randrange(vocab) for _ in range(L)] for L in lens]


_HF_MODEL: dict = {}
_HF_OUT: dict = {}


def hf_greedy(path: str, prompts: list[list[int]], max_new: int = MAX_NEW) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, run alone (no padding), in float64."""
    todo = [p for p in prompts if (path, tuple(p), max_new) not in _HF_OUT]
    if todo:
        model = _hf_model(path)
        with torch.no_grad():
            for p in todo:
                ids = torch.tensor([p])
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new, min_new_tokens=max_new, eos_token_id=None, pad_token_id=0)
                _HF_OUT[path, tuple(p), max_new] = gen[0, len(p):].tolist()
    return [list(_HF_OUT[path, tuple(p), max_new]) for p in prompts]


def _hf_model(path: str):
    """transformers' model of the checkpoint in float64 (one in memory at a time): AutoModelForCausalLM's, or the
    class config.json names where that has none (a multimodal checkpoint served as its text model: GLM-5.3-Flash)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    if path not in _HF_MODEL:
        _HF_MODEL.clear()
        cfg = AutoConfig.from_pretrained(path)
        cls = (AutoModelForCausalLM if type(cfg) in AutoModelForCausalLM._model_mapping
               else getattr(transformers, cfg.architectures[0]))
        _HF_MODEL[path] = cls.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
    return _HF_MODEL[path]


def engine_greedy(llm, prompts, max_new: int = MAX_NEW) -> list[list[int]]:
    from moelink.engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def assert_same(got: list[list[int]], want: list[list[int]], prompts: list[list[int]]) -> None:
    """Token for token, naming the first prompt that differs."""
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"prompt {i} (len {len(prompts[i])}): engine {g} != transformers {w}"
    assert len(got) == len(want)


def assert_pool_free(llm) -> None:
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert not llm.engine.has_unfinished_requests()


def check_prefix_cache_parity(llm_factory, path: str, vocab: int, n: int, max_suffix: int, seed: int = 3) -> None:
    """n prompts share a 64-token prefix (4 blocks of 16) and end in 1..max_suffix tokens of their own: after
    the first, every prompt must hit the cached prefix (asserted), and all must equal transformers."""
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab) for _ in range(64)]
    ps = [prefix + [rng.randrange(vocab) for _ in range(rng.randint(1, max_suffix))] for _ in range(n)]
    llm = llm_factory(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=128, num_kv_blocks=128,
                      block_size=16)
    first = engine_greedy(llm, ps[:1])
    hits_before = llm.engine.stats().prefix_cache_hits
    rest = engine_greedy(llm, ps[1:])
    hits = llm.engine.stats().prefix_cache_hits - hits_before
    assert hits >= 64 * (n - 1), f"expected the 64-token prefix to hit for {n - 1} prompts, got {hits} hit tokens"
    assert_same(first + rest, hf_greedy(path, ps), ps)
    assert_pool_free(llm)


def check_chunked_batched(path: str, ps: list[list[int]]) -> None:
    """Greedy parity with 1-150-token prompts together under a 24-token budget (chunked prefills, batches of up to 6
    sequences): every prompt's tokens equal transformers', the outputs vary (not a degenerate model), the pool ends
    free."""
    from moelink.engine import LLM

    llm = LLM(path, dtype="float64", max_num_seqs=6, max_num_batched_tokens=24, num_kv_blocks=256, block_size=8)
    got = engine_greedy(llm, ps)
    assert len({t for out in got for t in out}) > 10, "degenerate model: greedy outputs barely vary"
    assert_same(got, hf_greedy(path, ps), ps)
    assert_pool_free(llm)


def check_under_preemption(path: str, ps: list[list[int]]) -> None:
    """The same prompts under a 32-block pool of 8 tokens (one 150-token prompt and a little more): six running
    sequences must preempt, and still equal transformers (whose outputs check_chunked_batched cached)."""
    from moelink.engine import LLM

    llm = LLM(path, dtype="float64", max_num_seqs=6, max_num_batched_tokens=48, num_kv_blocks=32, block_size=8)
    got = engine_greedy(llm, ps)
    assert llm.engine.stats().num_preemptions_total > 0
    assert_same(got, hf_greedy(path, ps), ps)
    assert_pool_free(llm)


def check_preemption_then_prefix_hits(path: str, ps: list[list[int]], **engine_kw) -> None:
    """A model with per-sequence state (linear attention, DeepSeek-V4's compressed entries): a pool small enough to
    preempt, then the same prompts again, which resume from state checkpoints at block boundaries (hits asserted);
    both passes equal transformers and the pool ends free."""
    from moelink.engine import LLM

    want = hf_greedy(path, ps)
    llm = LLM(path, **{**dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=64, num_kv_blocks=24,
                              block_size=8, num_state_checkpoints=16), **engine_kw})
    assert_same(engine_greedy(llm, ps), want, ps)
    assert llm.engine.stats().num_preemptions_total > 0
    hits_before = llm.engine.stats().prefix_cache_hits
    assert_same(engine_greedy(llm, ps), want, ps)
    assert llm.engine.stats().prefix_cache_hits > hits_before
    assert_pool_free(llm)


_HF_NOCACHE_OUT: dict = {}


def hf_greedy_nocache(path: str, prompts: list[list[int]], max_new: int = MAX_NEW) -> list[list[int]]:
    """transformers' greedy continuation of each prompt computed with no KV cache: its full forward over the whole
    sequence again for every new token (float64). The oracle of DeepSeek Sparse Attention models, whose definition is
    transformers' forward without a cache (transformers 5.24's cached generate selects other positions than its own
    forward once a context passes index_topk tokens). Cached per prompt like hf_greedy."""
    todo = [p for p in prompts if (path, tuple(p), max_new) not in _HF_NOCACHE_OUT]
    if todo:
        for p, out in zip(todo, hf_greedy_nocache_with(_hf_model(path), todo, max_new)):
            _HF_NOCACHE_OUT[path, tuple(p), max_new] = out
    return [list(_HF_NOCACHE_OUT[path, tuple(p), max_new]) for p in prompts]


def hf_greedy_nocache_with(model, prompts: list[list[int]], max_new: int = MAX_NEW) -> list[list[int]]:
    """hf_greedy_nocache on a model already built (a fake-quantized one: tests/helpers/fp8_checkpoints.py)."""
    outs = []
    with torch.no_grad():
        for p in prompts:
            seq = list(p)
            for _ in range(max_new):
                logits = model(torch.tensor([seq]), use_cache=False, logits_to_keep=1).logits
                seq.append(int(logits[0, -1].argmax()))
            outs.append(seq[len(p):])
    return outs
