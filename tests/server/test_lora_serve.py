"""LoRA adapters through `moelink serve` and the `openai` client (docs/lora.md#serving-adapters): one server for the
file, a tiny random Qwen3-MoE in float64 and adapters made with peft; `--lora-modules` in both of vLLM's forms, the
request's `model` naming the adapter, `/v1/models` listing each with its parent, and a third adapter loaded, used and
unloaded while requests run. Every answer is the Python API's greedy text for that adapter and prompt."""
from __future__ import annotations

import concurrent.futures
import json

import grpc
import pytest

from tests.helpers.grpc_server import ServerProcess, make_stubs
from tests.helpers.net import free_port
from tests.helpers.smg_gateway import http_request, smg_executable

pytestmark = pytest.mark.slow  # a server, smg and an in-process engine over peft-made adapters (tens of seconds)

KEY = "sk-lora-serve"
AUTH = {"authorization": f"Bearer {KEY}"}
BASE = "tiny-base"
ADAPTERS = {  # name -> (peft LoraConfig fields, seed); "c" is loaded while the server runs
    "a": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), 1),
    "b": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True), 2),
    "c": (dict(r=2, lora_alpha=4, target_modules=["o_proj"]), 3),
}
PROMPTS = ("Once upon a time", "Hello, my name is", "The quick brown fox")
MAX_TOKENS = 8
CHAT = [{"role": "user", "content": "Hi"}]
CHAT_TOKENS = 6
_API_LINE = r"moelink: OpenAI API on http://127\.0\.0\.1:(\d+)/v1"


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(base dir, {adapter: dir}, {(adapter or None, prompt): the Python API's greedy text})."""
    from moelink.engine import LLM, LoRARequest, SamplingParams
    from moelink.engine.tools.tiny_model import make_tiny_model
    from tests.engine.test_lora import _make_adapter

    root = tmp_path_factory.mktemp("lora-serve")
    base = str(make_tiny_model(root / "base", "qwen3_moe", dtype="float64", num_layers=2, mlp_only_layers=[0]))
    dirs = {}
    for name, (fields, seed) in ADAPTERS.items():
        dirs[name] = str(root / name)
        _make_adapter(base, dirs[name], fields, seed)
    llm = LLM(base, dtype="float64", enable_lora=True, max_loras=3, max_lora_rank=8, num_kv_blocks=256)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    keys = [(name, p) for name in (None, *ADAPTERS) for p in PROMPTS]
    # The chat prompt the Responses and Messages APIs send for CHAT (smg applies the model's chat template), for
    # the base and adapter "a", its first CHAT_TOKENS tokens.
    templated = llm.get_tokenizer().apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    chat_keys = [(None, templated), ("a", templated)]
    loras = [None if n is None else LoRARequest(n, list(ADAPTERS).index(n) + 1, dirs[n]) for n, _ in keys + chat_keys]
    outs = llm.generate([p for _, p in keys], params, use_tqdm=False, lora_request=loras[:len(keys)])
    outs += llm.generate([p for _, p in chat_keys], SamplingParams(temperature=0.0, max_tokens=CHAT_TOKENS,
                                                                     ignore_eos=True),
                         use_tqdm=False, lora_request=loras[len(keys):])
    # A last token that ends inside a UTF-8 character: smg holds its bytes back, the Python API writes U+FFFD.
    want = {k: o.outputs[0].text.rstrip("\ufffd") for k, o in zip(keys + [(n, "chat") for n, _ in chat_keys], outs)}
    del llm
    for p in PROMPTS:  # each adapter moves the base model's text: the checks below tell them apart
        assert len({want[(n, p)] for n in (None, *ADAPTERS)}) == 4, p
    return base, dirs, want


@pytest.fixture(scope="module")
def server(case):
    if smg_executable() is None:
        pytest.skip("the smg gateway (PyPI `smg`) is not installed")
    base, dirs, _ = case
    port = free_port()
    b_json = json.dumps({"name": "b", "path": dirs["b"], "base_model_name": BASE})
    srv = ServerProcess(base, ["--dtype", "float64", "--max-model-len", "256", "--num-kv-blocks", "512",
                               "--served-model-name", BASE, "--api-key", KEY, "--http-port", str(port),
                               "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
                               "--lora-modules", f"a={dirs['a']}", b_json],
                        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"})
    try:
        srv.wait_for_line(_API_LINE, 60, "the OpenAI API line")
        yield srv, port
    finally:
        srv.stop()
        srv.close()


def _client(port: int):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, timeout=120, max_retries=0)


def _text(client, model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == max_tokens
    assert out.model == model  # the adapter's name, as vLLM answers (smg's says the base: the front renames it)
    return out.choices[0].text.rstrip("\ufffd")


def _wait_ready(client) -> None:
    """smg answers 503 `tokenizer_not_ready` for a moment after it lists the model (the front retries it)."""
    _text(client, BASE, PROMPTS[0], 1)


def _post(port: int, path: str, body: dict, headers=AUTH) -> tuple[int, dict]:
    status, raw = http_request(port, "POST", path, body, headers)
    return status, json.loads(raw)


def test_models_lists_the_base_and_each_adapter_with_its_parent(server, case):
    _, port = server
    _, dirs, _ = case
    models = _client(port).models.list().data
    assert [m.id for m in models] == [BASE, "a", "b"]
    assert [getattr(m, "parent") for m in models] == [None, BASE, BASE]
    assert [getattr(m, "root") for m in models][1:] == [dirs["a"], dirs["b"]]


def test_adapters_and_the_base_interleaved_each_get_their_tokens(server, case):
    _, port = server
    _, _, want = case
    client = _client(port)
    _wait_ready(client)
    jobs = [(name, p) for p in PROMPTS for name in (None, "a", "b")] * 2  # 18 requests, the three models mixed
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        got = list(pool.map(lambda job: _text(client, job[0] or BASE, job[1]), jobs))
    assert got == [want[job] for job in jobs]
    chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0)
    assert chat.usage.completion_tokens == 4 and chat.model == "a"
    chunks = list(client.completions.create(model="b", prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert {c.model for c in chunks} == {"b"}
    assert "".join(c.choices[0].text for c in chunks if c.choices).rstrip("\ufffd") == want[("b", PROMPTS[2])]


def test_the_responses_and_messages_apis_take_an_adapter(server, case):
    """smg's /v1/responses and /v1/messages generate too: a `model` naming an adapter runs under it (the front relays
    it under the base's name, as chat), the answer names the adapter, plain and streamed."""
    _, port = server
    _, _, want = case
    _wait_ready(_client(port))
    assert want[("a", "chat")] != want[(None, "chat")]
    for model in (BASE, "a"):
        text = want[(None if model == BASE else model, "chat")]
        status, out = _post(port, "/v1/responses", {"model": model, "input": CHAT, "max_output_tokens": CHAT_TOKENS,
                                                    "temperature": 0})
        assert status == 200 and out["model"] == model, out
        assert out["output"][0]["content"][0]["text"].rstrip("\ufffd") == text
        status, out = _post(port, "/v1/messages", {"model": model, "messages": CHAT, "max_tokens": CHAT_TOKENS,
                                                   "temperature": 0})
        assert status == 200 and out["model"] == model, out
        assert out["content"][0]["text"].rstrip("\ufffd") == text
    events = _sse(port, "/v1/messages", {"model": "a", "messages": CHAT, "max_tokens": CHAT_TOKENS, "stream": True,
                                         "temperature": 0})
    assert events[0]["message"]["model"] == "a"
    assert "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta").rstrip("\ufffd") \
        == want[("a", "chat")]
    events = _sse(port, "/v1/responses", {"model": "a", "input": CHAT, "max_output_tokens": CHAT_TOKENS,
                                          "stream": True, "temperature": 0})
    assert events[0]["response"]["model"] == "a"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta").rstrip("\ufffd") \
        == want[("a", "chat")]


def _sse(port: int, path: str, body: dict) -> list[dict]:
    status, raw = http_request(port, "POST", path, body, AUTH)
    assert status == 200, raw
    return [json.loads(line[5:]) for line in raw.decode().splitlines() if line.startswith("data:")
            and line[5:].strip() != "[DONE]"]


def test_an_unknown_model_is_404_naming_it(server):
    import openai

    _, port = server
    with pytest.raises(openai.NotFoundError) as exc:
        _client(port).completions.create(model="no-such-adapter", prompt="x", max_tokens=1)
    assert "no-such-adapter" in str(exc.value)
    for path, body in (("/v1/responses", {"input": "Hi", "max_output_tokens": 2}),
                       ("/v1/messages", {"messages": CHAT, "max_tokens": 2})):
        status, out = _post(port, path, {"model": "no-such-adapter", **body})
        assert status == 404 and "no-such-adapter" in json.dumps(out), (path, out)


def test_load_while_requests_run_use_it_unload_it_then_it_is_refused(server, case):
    import openai

    srv, port = server
    _, dirs, want = case
    client = _client(port)
    _wait_ready(client)
    # Refused: without the API key, a path that holds no adapter, the base model's name.
    status, _ = _post(port, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": dirs["c"]}, headers={})
    assert status == 401
    status, out = _post(port, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": dirs["c"] + "-missing"})
    assert status == 400 and out["error"]["param"] == "lora_path", out
    status, out = _post(port, "/v1/load_lora_adapter", {"lora_name": BASE, "lora_path": dirs["c"]})
    assert status == 400 and out["error"]["param"] == "lora_name", out
    # Loaded while the base model and adapters a and b generate.
    running = [(name, p) for p in PROMPTS for name in (None, "a", "b")]
    with concurrent.futures.ThreadPoolExecutor(len(running)) as pool:
        futures = [pool.submit(_text, client, name or BASE, p) for name, p in running]
        status, out = _post(port, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": dirs["c"]})
        assert status == 200, out
        assert [f.result() for f in futures] == [want[job] for job in running]
    status, out = _post(port, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": dirs["c"]})
    assert status == 400 and "already been loaded" in out["error"]["message"], out
    assert [m.id for m in client.models.list().data] == [BASE, "a", "b", "c"]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda p: _text(client, "c", p), PROMPTS))
    assert got == [want[("c", p)] for p in PROMPTS]
    # The moelink.v1 gRPC request names it too.
    with grpc.insecure_channel(srv.addr) as channel:
        stubs = make_stubs(channel)
        msgs = list(stubs.native.Generate(stubs.pb.GenerateRequest(
            prompt=PROMPTS[0], lora_name="c", sampling_params=stubs.pb.SamplingParams(
                max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)), timeout=60,
            metadata=(("authorization", f"Bearer {KEY}"),)))
        assert "".join(m.text for m in msgs).rstrip("\ufffd") == want[("c", PROMPTS[0])]
    status, out = _post(port, "/v1/unload_lora_adapter", {"lora_name": "c"})
    assert status == 200, out
    assert [m.id for m in client.models.list().data] == [BASE, "a", "b"]
    with pytest.raises(openai.NotFoundError) as exc:
        _text(client, "c", PROMPTS[0])
    assert "`c`" in str(exc.value)
    status, out = _post(port, "/v1/unload_lora_adapter", {"lora_name": "c"})
    assert status == 404 and out["error"]["param"] == "lora_name", out
    with grpc.insecure_channel(srv.addr) as channel:
        stubs = make_stubs(channel)
        with pytest.raises(grpc.RpcError) as rpc:
            list(stubs.native.Generate(stubs.pb.GenerateRequest(prompt="x", lora_name="c"), timeout=60,
                                       metadata=(("authorization", f"Bearer {KEY}"),)))
        assert rpc.value.code().name == "INVALID_ARGUMENT" and "lora_name='c'" in rpc.value.details()
    assert _text(client, "a", PROMPTS[1]) == want[("a", PROMPTS[1])]  # the others still served
