"""Structured output (engine/structured_output.py): every sampled output matches its grammar.

On the built-in model `make serve` serves (builtin-model/, trained on docstrings: left alone it writes
English-like prose, never JSON), so a valid output for 20 seeded temperature-1 samples is the grammar's
doing, with the tokenizer users meet first. Specs are kept short (enums, small ints) so outputs complete
within max_tokens.
"""
from pathlib import Path

import json
import re

import pytest

from moelink.engine import LLM
from moelink.engine.sampling_params import SamplingParams
from moelink.engine.structured_output_params import StructuredOutputParams

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]},
                   "n": {"type": "integer", "minimum": 0, "maximum": 9},
                   "ok": {"type": "boolean"}},
    "required": ["color", "n", "ok"],
    "additionalProperties": False,
}
PROMPTS = ["The answer is", "def main():", "Once upon a time", "x = 1"]


BUILTIN = str(Path(__file__).resolve().parents[2] / "builtin-model")


@pytest.fixture(scope="module")
def llm():
    with LLM(BUILTIN, dtype="float32", max_model_len=256, num_kv_blocks=64) as llm:
        yield llm


def _sample(llm, so: StructuredOutputParams, n=20, max_tokens=64):
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=max_tokens, structured_outputs=so) for s in range(n)]
    outs = llm.generate([PROMPTS[s % len(PROMPTS)] for s in range(n)], params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def test_json_schema_20_seeded_samples_validate(llm):
    for out in _sample(llm, StructuredOutputParams(json=SCHEMA)):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_json_object_parses(llm):
    for out in _sample(llm, StructuredOutputParams(json_object=True), n=6, max_tokens=24):
        if out.finish_reason == "stop":  # an open object may be cut by max_tokens, as in vLLM
            assert isinstance(json.loads(out.text), dict)
        else:
            assert out.text.startswith("{")


def test_regex_fullmatch(llm):
    pattern = r"(cat|dog)-[0-9]{2,3}"
    for out in _sample(llm, StructuredOutputParams(regex=pattern)):
        assert out.finish_reason == "stop"
        assert re.fullmatch(pattern, out.text), out.text


def test_choice_and_grammar(llm):
    choices = ["yes", "no", "maybe \"so\""]
    for out in _sample(llm, StructuredOutputParams(choice=choices)):
        assert out.text in choices
    ebnf = 'root ::= "(" digit ("+" digit)* ")"\ndigit ::= [0-9]'
    for out in _sample(llm, StructuredOutputParams(grammar=ebnf), n=6, max_tokens=40):
        if out.finish_reason == "stop":
            assert re.fullmatch(r"\([0-9](\+[0-9])*\)", out.text), out.text


def test_mixed_batch_and_unconstrained_rows(llm):
    # A constrained row next to a free one and a greedy one: masks go to their own rows only.
    so = StructuredOutputParams(regex=r"[a-c]{4}")
    params = [SamplingParams(temperature=1.0, seed=1, max_tokens=8, structured_outputs=so),
              SamplingParams(temperature=1.0, seed=2, max_tokens=8),
              SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=so)]
    outs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    assert re.fullmatch(r"[a-c]{4}", outs[0].outputs[0].text)
    assert re.fullmatch(r"[a-c]{4}", outs[2].outputs[0].text)
    free = LLM.generate(llm, [PROMPTS[1]], [params[1]], use_tqdm=False)[0].outputs[0]
    assert free.token_ids == outs[1].outputs[0].token_ids


@pytest.mark.parametrize("kw, field", [
    (dict(json='{"type": "object", "properties": {"a": {"type": "nope"}}}'), "json"),
    (dict(json="{not json"), "json"),
    (dict(regex="(unclosed"), "regex"),
    (dict(grammar="root ::= undefined_rule"), "grammar"),
    (dict(choice=[]), "choice"),
])
def test_invalid_specs_name_the_field(llm, kw, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.structured_outputs\.{field}="):
        llm.generate(["hi"], SamplingParams(structured_outputs=StructuredOutputParams(**kw)), use_tqdm=False)


def test_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputParams()


def test_grammar_survives_preemption(tiny_model):
    # 8 blocks of 16 tokens for 6 requests that each grow past 2 blocks: the scheduler must preempt
    # (recompute) some; their matchers keep the generated tokens, so outputs still validate.
    with LLM(tiny_model("qwen3_e6k3"), dtype="float32", max_model_len=256, num_kv_blocks=8, block_size=16) as llm:
        outs = _sample(llm, StructuredOutputParams(json=SCHEMA), n=6, max_tokens=64)
        assert llm.engine.stats().num_preemptions_total > 0
    for out in outs:
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_bitmask_unpacking_matches_xgrammar():
    # The sampler's own unpacking (numpy, any device) against xgrammar's apply_token_bitmask_inplace, for a
    # vocabulary that is not a multiple of 32 and a batch with an unconstrained row.
    import numpy as np
    import torch
    import xgrammar as xgr

    from moelink.engine.sampler import _unpack_bitmasks

    V = 77
    rng = np.random.default_rng(0)
    masks = rng.integers(-2**31, 2**31, size=(2, 3), dtype=np.int64).astype(np.int32)
    allowed = _unpack_bitmasks([masks[0].tobytes(), None, masks[1].tobytes()], V, torch.device("cpu"))
    logits = torch.zeros(2, V)
    xgr.apply_token_bitmask_inplace(logits, torch.from_numpy(masks))
    assert torch.equal(allowed[[0, 2]], logits == 0)
    assert allowed[1].all()


def test_a_compiling_grammar_never_blocks_the_engine_loop(llm):
    # The compile is held until a free request has finished: process_inputs waits on its own thread (as a
    # server handler does) while this thread, the engine loop, keeps stepping.
    import threading

    from moelink.engine.structured_output import GrammarCompilerPool

    engine = llm.engine
    release = threading.Event()
    real = GrammarCompilerPool._compile
    processed = []

    def held(self, params):
        assert release.wait(30)
        return real(self, params)

    so = StructuredOutputParams(regex="[xy]{3}")
    GrammarCompilerPool._compile = held
    try:
        waiter = threading.Thread(target=lambda: processed.append(engine.process_inputs(
            "c", "Hello", SamplingParams(max_tokens=8, seed=0, structured_outputs=so))))
        waiter.start()
        engine.add_request("f", "Hello", SamplingParams(max_tokens=4, ignore_eos=True))
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        assert steps >= 4 and waiter.is_alive() and not processed
        release.set()
        waiter.join(30)
    finally:
        GrammarCompilerPool._compile = real
    engine.add_processed(processed[0])
    outs = []
    while engine.has_requests():
        outs.extend(o for o in engine.step() if o.finished)
    assert re.fullmatch("[xy]{3}", outs[-1].outputs[0].text)
