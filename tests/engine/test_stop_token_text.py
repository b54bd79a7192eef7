"""A request that a stop token ends (EOS or a stop_token_ids id) has no text for that token, as vLLM 0.32's
detokenizer leaves it out (`stop_terminated`) unless include_stop_str_in_output; generation_config.json's EOS ids
other than the tokenizer's are stop token ids (`stop_reason` the id), as vLLM's
`SamplingParams.update_from_generation_config` makes them.
"""
from __future__ import annotations

import pytest

from moelink.engine.core.output_processor import OutputProcessor
from moelink.engine.core.outputs import OutputKind, WeightVersionSpan
from moelink.engine.core.tokenizer import Tokenizer
from moelink.engine.contract.sampling_params import SamplingParams
from moelink.engine.tools.builtin_model import BUILTIN_MODEL_DIR
from moelink.scheduler.engine_output import EngineCoreOutput


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(BUILTIN_MODEL_DIR)


def _run(tok, params: SamplingParams, kind: OutputKind, steps: list[list[int]], finish: tuple):
    """The outputs of one request fed `steps` of token ids, the last step finishing with (reason, stop_reason)."""
    proc = OutputProcessor(tok)
    prompt = tok.encode("If the argument is")
    proc.add_request("r", "If the argument is", prompt, params, kind)
    outs = []
    for i, ids in enumerate(steps):
        last = i == len(steps) - 1
        co = EngineCoreOutput("r", list(ids), finish_reason=finish[0] if last else None,
                              stop_reason=finish[1] if last else None)
        outs += proc.process([co])[0]
    return outs


@pytest.mark.parametrize("kind", [OutputKind.FINAL_ONLY, OutputKind.CUMULATIVE, OutputKind.DELTA])
def test_a_stop_tokens_text_is_left_out_unless_asked(tok, kind):
    ids = tok.encode(" not None, the")
    stop_id = ids[-1]
    steps = [[t] for t in ids]
    joined = lambda outs: "".join(o.outputs[0].text for o in outs) if kind is OutputKind.DELTA \
        else outs[-1].outputs[0].text

    outs = _run(tok, SamplingParams(stop_token_ids=[stop_id]), kind, steps, ("stop", stop_id))
    assert joined(outs) == tok.decode(ids[:-1])
    assert outs[-1].outputs[0].stop_reason == stop_id
    if kind is not OutputKind.DELTA:
        assert outs[-1].outputs[0].token_ids == ids  # the token itself stays among the ids

    kept = _run(tok, SamplingParams(stop_token_ids=[stop_id], include_stop_str_in_output=True), kind, steps,
                ("stop", stop_id))
    assert joined(kept) == tok.decode(ids)
    # a length finish keeps its last token's text
    assert joined(_run(tok, SamplingParams(), kind, steps, ("length", None))) == tok.decode(ids)


def test_eos_text_is_left_out_with_special_tokens_shown(tok):
    ids = tok.encode(" not None") + [tok.eos_token_id]
    outs = _run(tok, SamplingParams(skip_special_tokens=False), OutputKind.FINAL_ONLY, [ids], ("stop", None))
    assert outs[-1].outputs[0].text == tok.decode(ids[:-1])


def test_generation_configs_other_eos_ids_are_stop_token_ids():
    """builtin-model: the tokenizer's EOS is 0, generation_config.json lists [0, 2]. Each value below is what the
    real vLLM 0.32 answered offline to the same request (2026-11-28)."""
    from moelink.engine import LLM

    llm = LLM(str(BUILTIN_MODEL_DIR), dtype="float32", max_model_len=128, seed=0)
    try:
        def first(**kw):
            return llm.generate(["If the argument is"], SamplingParams(temperature=0, max_tokens=3, **kw),
                                use_tqdm=False)[0].outputs[0]

        two = first(allowed_token_ids=[2], skip_special_tokens=False)
        assert (two.token_ids, two.finish_reason, two.stop_reason, two.text) == ([2], "stop", 2, "")
        assert first(allowed_token_ids=[2], skip_special_tokens=False, include_stop_str_in_output=True).text == \
            "<|im_end|>"
        assert two.weight_versions == [WeightVersionSpan("default", 0, 1)]  # vLLM's name for unlabelled weights
        eos = first(allowed_token_ids=[0])
        assert (eos.token_ids, eos.finish_reason, eos.stop_reason) == ([0], "stop", None)
        ignored = first(allowed_token_ids=[2], ignore_eos=True)
        assert (ignored.token_ids, ignored.finish_reason, ignored.text) == ([2, 2, 2], "length", "")
    finally:
        llm.shutdown()
