"""A tiny Kimi-K2.5-shaped INT4 checkpoint (DeepSeek-V3 text model under language_model., compressed-tensors
pack-quantized experts, group 32; its tokenizer shipped as tiktoken.model) served on a GPU by the Triton kernels
agrees with the engine on CPU (reference kernels): `pytest -m gpu`, the `int4` step of benchmarks/gpu_session.sh.

Both runs float32; compared as tests/engine/test_gpu_engine.py compares (top-20 logprobs per step while the tokens
agree, within 1e-3). One engine step holds the whole batch's prefill (16 prompts, ~3,600 tokens: 1,200 rows per
expert of the 6 at top-2), so the experts run every path of int4_moe_default.json: the dequantize-once path in
that step, the per-tile path and the GEMVs as the decode batch shrinks (decode steps replay CUDA graphs)."""
from __future__ import annotations

import os
import random

import pytest
import torch

from moelink.engine import LLM, SamplingParams

from tests.engine.test_gpu_engine import step_gaps

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only")]


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    from tests.helpers.int4_checkpoints import int4_checkpoint, kimi_k25_checkpoint, save_tiny
    from tests.helpers.tiktoken_tokenizer import train_ranks, write_kimi_tokenizer
    from moelink.engine.core.tiktoken_files import KIMI

    root = tmp_path_factory.mktemp("kimi_gpu")
    dsv3 = int4_checkpoint(save_tiny(root / "float", "dsv3"), root / "int4", True, 32, "experts")
    k25 = kimi_k25_checkpoint(dsv3, root / "k25")
    write_kimi_tokenizer(k25, train_ranks(KIMI.pattern, 100))
    return k25


def _generate(path, prompts, device):
    llm = LLM(path, dtype="float32", device=device, max_num_seqs=16, max_num_batched_tokens=4096,
              num_kv_blocks=512, block_size=16)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=20)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs])
            for o in outs]


def test_int4_kimi_on_gpu_matches_cpu_reference(kimi):
    rng = random.Random(44)
    prompts = [{"prompt_token_ids": [rng.randrange(356) for _ in range(rng.randint(210, 270))]} for _ in range(16)]
    prompts[0] = "the robot paints three apples near the station"  # through the tiktoken tokenizer
    gaps = step_gaps(_generate(kimi, prompts, "cuda"), _generate(kimi, prompts, "cpu"))
    assert len(gaps) >= len(prompts), f"only {len(gaps)} steps shared a context"
    assert max(gaps) < 1e-3, f"fp32 logprobs differ by {max(gaps):.3g}"
