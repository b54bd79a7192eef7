"""DeepSeek-V4 end to end on the Triton kernels (kernels/triton_compressed_attention.py, triton_compressed_topk.py, triton_compressed_attention_paged.py,
with the rest of TritonKernels: norms, router, fused MoE): the tiny checkpoint of tests/helpers/dsv4_checkpoint.py (every attention
kind, compress rates 2 and 8, an indexer top-4, a window of 6) gives the reference kernels' greedy tokens in
float32, with prompts that cross several compression boundaries and the top-k, in chunks, two sequences per step.
On CPU the kernels run in the Triton interpreter in a fresh process (Triton reads TRITON_INTERPRET when a kernel is
defined: tests/helpers/fast_interpreter.interpreter_env)."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from moelink.engine import LLM

from tests.helpers.dsv4_checkpoint import VOCAB, save_dsv4_checkpoint
from tests.helpers.fast_interpreter import interpreter_env
from tests.helpers.parity import assert_same, engine_greedy, prompts
from tests.helpers import zygote

ENGINE = dict(dtype="float32", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=24, block_size=8)

_TRITON_RUN = """
import collections, json, sys
import moelink.kernels.triton_compressed_attention as k4, moelink.kernels.triton_compressed_topk as t4, moelink.kernels.triton_hyper_connection as h4
import moelink.kernels.triton_compressed_attention_paged as p4
from moelink.engine import LLM, SamplingParams
calls = collections.Counter()
def counted(mod, name):
    fn = getattr(mod, name)
    setattr(mod, name, lambda *a, **k: calls.update([name]) or fn(*a, **k))  # TritonKernels reads it when built
for name in ("triton_compress_kv", "triton_sink_attention", "triton_grouped_linear"):
    counted(k4, name)
counted(t4, "triton_compressed_indexer_topk")
counted(h4, "triton_hc_expand")
counted(p4, "triton_paged_sink_attention")
counted(p4, "triton_paged_compressed_indexer_topk")
llm = LLM(sys.argv[1], kernels="triton", skip_warmup=True, **json.loads(sys.argv[3]))  # warm-up: test_triton_warmup.py
ps = json.loads(sys.argv[2])
outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
print("CALLS", json.dumps(calls))
print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]))
"""


@pytest.mark.slow  # a fresh process, and the interpreter runs every kernel of each step
def test_triton_kernels_equal_reference_kernels_greedy(tmp_path_factory):
    path = save_dsv4_checkpoint(tmp_path_factory.mktemp("dsv4"))
    ps = [p for p in prompts(VOCAB, seed=7, n=2, lo=11, hi=21)]
    env = interpreter_env() if not torch.cuda.is_available() else dict(os.environ)
    # Forked by the test zygote (torch, transformers imported once), TRITON_INTERPRET and the fast interpreter's
    # sitecustomize taking effect as at an exec'd start (tests/helpers/zygote.py).
    proc = zygote.run([sys.executable, "-c", _TRITON_RUN, path, json.dumps(ps), json.dumps(ENGINE)], env=env,
                      capture_output=True, text=True, timeout=600, cwd=os.getcwd(), fork_code=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("TOKENS", 1)[1])
    calls = json.loads(proc.stdout.split("CALLS", 1)[1].split("TOKENS")[0])
    # Every layer's attention and output projection ran on Triton, the compressors (3 layers, 2 under CSA) and the
    # indexer (2 CSA layers) too, on each of the >= 4 steps: prefill and mixed steps on the per-sequence ops, decode
    # steps on the paged ones (kernels/triton_compressed_attention_paged.py).
    attention = calls.get("triton_sink_attention", 0) + calls.get("triton_paged_sink_attention", 0)
    indexer = calls.get("triton_compressed_indexer_topk", 0) + calls.get("triton_paged_compressed_indexer_topk", 0)
    assert attention >= 4 * 4 and calls.get("triton_grouped_linear", 0) >= 4 * 4, calls
    assert calls.get("triton_compress_kv", 0) > 0 and indexer >= 2 * 4, calls
    assert calls.get("triton_paged_sink_attention", 0) >= 4 and calls.get("triton_paged_compressed_indexer_topk", 0) >= 2
    assert calls.get("triton_hc_expand", 0) >= 2 * 4 * 4, calls  # both residuals of every layer, every step
    ref = LLM(path, kernels="reference", **ENGINE)
    assert_same(got, engine_greedy(ref, ps, max_new=4), ps)
