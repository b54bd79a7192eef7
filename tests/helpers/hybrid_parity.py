"""Parity checks of a hybrid family: a model whose state layers (Mamba1, Mamba2, gated DeltaNet, ...) keep
per-sequence state beside its attention layers, against transformers' own model in float64 (tests/engine/
test_jamba.py, test_granitemoehybrid.py). What they add to tests/helpers/parity.py's chunked / preemption / prefix-hit
checks: prompt logprobs, a short batch, speculative verify steps whose rejected drafts are replayed out of the
states, tied embeddings, and the Triton kernels (the interpreter on a CPU) against the reference kernels.

A new hybrid family's test uses them with its drawn preset (tests/helpers/drawn_presets.py) and a module-scoped
fixture of the saved checkpoint; each test keeps its own name, marks and docstring (what the family's states are):

    @pytest.fixture(scope="module")
    def family_path(tmp_path_factory) -> str:
        return save_preset(tmp_path_factory.mktemp("family"), FAMILY)

    def test_prompt_logprobs_equal_transformers(family_path):
        check_prompt_logprobs(family_path)

    def test_greedy_parity_short(family_path):
        check_greedy_short(family_path)

    @pytest.mark.slow
    def test_greedy_parity_chunked_batched(family_path):
        check_chunked_batched(family_path, parity_prompts())      # and check_under_preemption,
                                                                  # check_preemption_then_prefix_hits (parity.py)
    @pytest.mark.slow
    @pytest.mark.parametrize("p_right", [0.7, 0.0])
    def test_speculative_decoding_replays_states(family_path, p_right):
        check_spec_decode_replays_states(family_path, p_right)

    @pytest.mark.slow
    def test_tied_embeddings_parity(tmp_path):
        check_tied_embeddings(tmp_path, FAMILY)

    @pytest.mark.slow
    def test_triton_kernels_equal_reference_kernels_greedy(tmp_path):
        check_triton_equals_reference(tmp_path, FAMILY, "moelink.kernels.triton_x", ("triton_x_scan", ...))
"""
from __future__ import annotations

import functools
import json
import os
import sys

import pytest
import torch

from moelink.engine import LLM, SamplingParams

from tests.helpers.drawn_presets import VOCAB, save_preset
from tests.helpers.parity import assert_pool_free, assert_same, engine_greedy, hf_greedy, prompts


def parity_prompts() -> list[list[int]]:
    """12 prompts of 1-150 tokens: several prefill chunks each under the checks' small token budgets."""
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


def check_prompt_logprobs(path: str) -> None:
    """A 40-token prompt in two prefill chunks: its logprobs equal transformers' log-softmax of its logits in float64
    (1e-5: transformers runs parts in float32, the Mamba scans and router softmaxes among them)."""
    prompt = prompts(VOCAB, seed=5, n=2, lo=40, hi=40)[0]
    llm = LLM(path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=24, num_kv_blocks=32, block_size=8)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
    with torch.no_grad():
        want_LV = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1], dim=-1)
    for p in range(1, len(prompt)):
        assert out.prompt_logprobs[p][prompt[p]].logprob == pytest.approx(want_LV[p - 1, prompt[p]].item(), abs=1e-5)


def check_greedy_short(path: str) -> None:
    """Three prompts (5-40 tokens) under a 16-token budget: chunked prefills and decode steps of a batch."""
    ps = prompts(VOCAB, seed=3, n=3, lo=5, hi=40)
    llm = LLM(path, dtype="float64", max_num_seqs=3, max_num_batched_tokens=16, num_kv_blocks=64, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=8), hf_greedy(path, ps, max_new=8), ps)
    assert_pool_free(llm)


def check_spec_decode_replays_states(path: str, p_right: float) -> None:
    """Drafts right with probability p_right (0: always wrong): the verifying sequences' states take only their
    accepted tokens (the mixers' replay_states), so greedy outputs equal transformers'; drafts were proposed, and
    accepted exactly when some could be right."""
    from moelink.benchmarks.spec_decode import OracleDrafter

    ps = parity_prompts()[:6]
    want = hf_greedy(path, ps)
    spec = {"method": "ngram", "num_speculative_tokens": 3,
            "drafter_factory": functools.partial(OracleDrafter, {tuple(p): w for p, w in zip(ps, want)}, p_right,
                                                 vocab=VOCAB, seed=4)}
    llm = LLM(path, speculative_config=spec, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48,
              num_kv_blocks=48, block_size=8, num_state_checkpoints=8)
    assert_same(engine_greedy(llm, ps), want, ps)
    sd = llm.engine.stats().spec_decode
    assert sd is not None and sd.num_draft_tokens > 0
    assert (sd.num_accepted_tokens > 0) == (p_right > 0)
    assert_pool_free(llm)


def check_tied_embeddings(tmp_path, preset) -> None:
    """`preset` saved with tie_word_embeddings: the LM head is the embedding table; greedy parity."""
    path = save_preset(tmp_path, preset, tie_word_embeddings=True)
    ps = prompts(VOCAB, seed=29, n=4, lo=2, hi=60)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)


# A fresh process (the Triton interpreter must be set before the kernels are defined) counting the calls of the
# named functions of a Triton kernel module, wrapped before the engine is built (it reads them when built).
_TRITON_RUN = """
import collections, importlib, json, sys
from moelink.engine import LLM, SamplingParams
module = importlib.import_module(sys.argv[4])
calls = collections.Counter()
for name in json.loads(sys.argv[5]):
    fn = getattr(module, name)
    setattr(module, name, lambda *a, _fn=fn, _n=name, **k: calls.update([_n]) or _fn(*a, **k))
llm = LLM(sys.argv[1], kernels="triton", skip_warmup=True, **json.loads(sys.argv[3]))
ps = json.loads(sys.argv[2])
outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
print("CALLS", json.dumps(calls))
print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]))
"""


def check_triton_equals_reference(tmp_path, preset, module: str, names: tuple[str, ...]) -> None:
    """Float32 on the Triton kernels (the interpreter on a CPU) gives the reference kernels' greedy tokens: chunked
    prompts, two sequences per step, decodes; each of `module`'s `names` (the state kernels) ran."""
    from tests.helpers import zygote
    from tests.helpers.fast_interpreter import interpreter_env

    path = save_preset(tmp_path, preset)
    ps = prompts(VOCAB, seed=7, n=2, lo=11, hi=21)
    engine = dict(dtype="float32", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=24, block_size=8)
    env = interpreter_env() if not torch.cuda.is_available() else dict(os.environ)
    proc = zygote.run([sys.executable, "-c", _TRITON_RUN, path, json.dumps(ps), json.dumps(engine), module,
                       json.dumps(list(names))], env=env, capture_output=True, text=True, timeout=600,
                      cwd=os.getcwd(), fork_code=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("TOKENS", 1)[1])
    calls = json.loads(proc.stdout.split("CALLS", 1)[1].split("TOKENS")[0])
    assert all(calls.get(name, 0) > 0 for name in names), calls
    llm = LLM(path, kernels="reference", **engine)
    assert_same(got, engine_greedy(llm, ps, max_new=4), ps)
