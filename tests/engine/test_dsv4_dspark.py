"""DeepSeek-V4's bundled DSpark stages (engine/models/deepseek_v4/dspark.py, registered for DeepseekV4ForCausalLM in
engine/models/blocks/dspark.DSPARK_STAGES) drafting as speculative method "dspark" with no `model`, on a tiny V4
(tests/helpers/dsv4_dspark_checkpoint.py: a 6-token window, so the stages' context is a window too; three
hyper-connection streams; top-k routed MoE in the stages):
- stages constructed to agree with a target made a bigram: nearly every draft accepted, greedy outputs equal
  decoding without speculation;
- random stages: outputs exact, drafts seldom accepted; `--load-format dummy` runs them too.
"""
from __future__ import annotations

import pytest

from moelink.engine import LLM

from tests.helpers.dspark_draws import acceptance, generate, kv_bytes
from tests.helpers.dsv4_dspark_checkpoint import save_dsv4_with_dspark

pytestmark = pytest.mark.usefixtures("heap_held_frozen")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return {"agree": save_dsv4_with_dspark(tmp_path_factory.mktemp("agree") / "c", agree=True),
            "random": save_dsv4_with_dspark(tmp_path_factory.mktemp("random") / "c")}


SPEC = {"method": "dspark", "num_speculative_tokens": 3}  # the tiny V4's smallest ring: 4 slots


@pytest.mark.slow
def test_agreeing_v4_stages_are_accepted_and_outputs_exact(ckpts):
    sd = acceptance(ckpts["agree"], SPEC, "V4 DSpark, agreeing stages")
    assert sd.acceptance_rate > 0.9, sd


@pytest.mark.slow
def test_random_v4_stages_keep_outputs_exact(ckpts):
    sd = acceptance(ckpts["random"], SPEC, "V4 DSpark, random stages")
    assert sd.num_verify_rows > 10 and sd.acceptance_rate < 0.5, sd


def test_dummy_v4_stages_load_and_draft(ckpts):
    got, stats = generate(ckpts["random"], SPEC, load_format="dummy")
    assert len(got) == 6 and stats.spec_decode.num_draft_tokens > 0


class _Oracle:
    """The target run from scratch by transformers in float64 (the mean over its streams at the input of each tap
    layer, read by hooks), the stages over the context window before the anchor and the block, then the Markov head:
    what the drafter's paged context cache, its gathers and the accepted offsets must reproduce."""

    def __init__(self, path: str):
        import torch
        from transformers import AutoModelForCausalLM

        from moelink.engine.config.model import ModelConfig
        from moelink.engine.spec.proposer.dspark import load_dspark
        from moelink.kernels.ops import ReferenceKernels

        self.torch = torch
        self.hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
        cfg = ModelConfig.from_pretrained(path, dtype="float64")

        class _Model:
            embed_tokens = self.hf.model.embed_tokens.weight.detach()
            lm_head = self.hf.lm_head.weight.detach()

        self.stages, self.dspark = load_dspark(None, cfg, _Model(), ReferenceKernels(), torch.device("cpu"))
        self.after = self.dspark.tap_counts(cfg.num_layers)
        self.seen: dict = {}
        for n, layer in enumerate(self.hf.model.layers):
            layer.register_forward_pre_hook(self._keeper(n), with_kwargs=True)

    def _keeper(self, n: int):
        def keep(module, args, kwargs):
            self.seen[n] = (args[0] if args else kwargs["hidden_states"])[0].detach()
        return keep

    def drafts(self, tokens: list[int], k: int) -> list[int]:
        torch = self.torch
        with torch.no_grad():
            m = len(tokens) - 1
            self.hf(torch.tensor([tokens[:m]]))
            taps = [self.seen[n].mean(dim=1) for n in self.after]  # [m, n, D] streams -> [m, D]
            rows = self.stages.context_rows(taps, torch.arange(m))
            W = self.stages.window
            ctx = [r[max(0, m - W):].flip(0)[None] for r in rows]  # newest first, as the drafter gathers
            valid = torch.ones(1, ctx[0].shape[1], dtype=torch.bool)
            ids = torch.tensor([[tokens[m]] + [self.dspark.mask_token_id] * (k - 1)])
            base = self.stages.base_logits(ids, torch.arange(m, m + k)[None], ctx, valid)
            prev, out = torch.tensor([tokens[m]]), []
            for i in range(k):
                prev = (base[:, i] + self.stages.markov_bias(prev)).argmax(-1)
                out.append(int(prev))
            return out


@pytest.mark.slow
def test_v4_dspark_drafts_equal_the_stages_run_from_scratch(ckpts, monkeypatch):
    """Random stages in float64: every draft equals the oracle's (the window of context rows, the anchor's position,
    the hyper-connection streams' mean at the tap layers' inputs)."""
    from tests.helpers.draft_spy import record_drafts

    seen = record_drafts(monkeypatch)
    generate(ckpts["random"], SPEC, dtype="float64")
    assert len(seen) > 20
    oracle = _Oracle(ckpts["random"])
    wrong = [(t, d, w) for t, d in seen if d != (w := oracle.drafts(t, 3))]
    assert not wrong, f"{len(wrong)} of {len(seen)} drafts differ, e.g. {wrong[0]}"


def test_kv_sizing_counts_the_stages_context_rows(ckpts):
    """Each bundled stage keeps one shared KV head a token (the drafter's kv_bytes_per_token), counted before the
    ranks size their caches."""
    got, want = kv_bytes(ckpts["random"])
    assert got == want == 2 * 16 * 4


def test_method_mtp_on_dspark_stages_is_refused(ckpts):
    with pytest.raises(ValueError, match="are DSpark stages .* use method 'dspark'"):
        LLM(ckpts["random"], dtype="float32", max_model_len=64, num_kv_blocks=16, block_size=8,
            speculative_config={"method": "mtp", "num_speculative_tokens": 1})
