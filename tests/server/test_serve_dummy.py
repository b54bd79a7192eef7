"""`moelink serve --load-format dummy` on a directory holding config.json alone: the start-up banner and log say
the weights are random; token-id requests are served on both protocols (no text: there is no tokenizer), a
text prompt is refused with the one sentence that says so."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import grpc
import pytest

from tests.helpers.grpc_server import MODEL, ServerProcess, make_stubs

pytestmark = pytest.mark.slow


def test_dummy_server_warns_and_serves_token_ids(tiny_model, tmp_path):
    shutil.copy(f"{tiny_model(MODEL)}/config.json", tmp_path / "config.json")
    srv = ServerProcess(str(tmp_path), ["--load-format", "dummy", "--device", "cpu", "--dtype", "float32",
                                        "--num-kv-blocks", "64"])
    try:
        srv.wait_for_line(r"moelink: WARNING: --load-format dummy: the weights are RANDOM", 5, "the banner")
        assert not any(line.startswith("moelink: tokenizer:") for line in srv.stdout_lines)
        assert "WARNING moelink.engine.core.llm_engine: --load-format dummy: the weights are RANDOM" in srv.logs()
        # No tokenizer, no grammar: the grammar fork server `moelink serve` forks at its start is ended (a server
        # with --no-http starts no other process but its rank's, engine/cluster/mp_rank.py).
        tasks = Path(f"/proc/{srv.pid}/task").iterdir()
        rank = re.search(r"MultiprocExecutor: rank process (\d+) ready", srv.logs())
        assert rank is not None, srv.logs()
        assert "".join((t / "children").read_text() for t in tasks).split() == [rank.group(1)]
        with grpc.insecure_channel(srv.addr) as ch:
            s = make_stubs(ch)
            sp = s.pb.SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
            msgs = list(s.native.Generate(s.pb.GenerateRequest(
                prompt_token_ids=s.pb.TokenIds(ids=[5, 17, 99]), sampling_params=sp), timeout=60))
            assert len([t for m in msgs for t in m.token_ids]) == 3 and not "".join(m.text for m in msgs)
            with pytest.raises(grpc.RpcError) as e:
                list(s.native.Generate(s.pb.GenerateRequest(prompt="hello", sampling_params=sp), timeout=60))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "has no tokenizer (no tokenizer.json" in e.value.details()
            vsp = s.vpb.SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
            vmsgs = list(s.vllm.Generate(s.vpb.GenerateRequest(
                request_id="v1", tokenized=s.vpb.TokenizedInput(input_ids=[5, 17, 99]), sampling_params=vsp),
                timeout=60))
            assert vmsgs[-1].HasField("complete") and vmsgs[-1].complete.completion_tokens == 3
    finally:
        assert srv.stop() == 0, srv.logs()[-4000:]
        srv.close()
