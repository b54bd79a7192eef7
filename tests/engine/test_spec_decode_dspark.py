"""Speculative decoding with DSpark draft layers (method "dspark", engine/spec/proposer/dspark.py), one rank, on a
tiny Qwen3-MoE target with DFlash-format drafts (engine/tools/dspark_checkpoint.py).

- A draft constructed to agree with the target (engine/tools/dspark_checkpoint.agreeing_draft: its Markov head is
  the target's bigram, its base logits zero, over a target whose layers are scaled down so that its next token is
  nearly that bigram): drafts are accepted often (the spec metrics' acceptance rate), and greedy outputs equal
  decoding without speculation, token for token, with chunked prefill, preemption and prefix-cache hits in play;
  over a target whose layers are zeroed (exactly the bigram) nearly every draft is accepted.
- A random draft: outputs still exact, drafts seldom accepted.
- Every draft the engine proposed equals an independent recomputation: the target run from scratch by transformers
  in float64 over the request's tokens (its residual stream at the tap layers read by hooks), the draft's stages
  over that whole context and the block, then the Markov head left to right (what the drafter's paged context
  cache, its gathers and the accepted offsets must reproduce).
- A stage's block attention equals a dense float64 formula written out here; config.json and
  --speculative-config errors name the field; a target that bundles dspark_* fields with no registered stages is
  refused naming the seam (engine/models/blocks/dspark.py).
"""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from moelink.engine import LLM, SamplingParams
from moelink.engine.config.dspark import read_bundled_dspark, read_dspark_draft
from moelink.engine.config.speculative import SpeculativeConfig
from moelink.engine.spec.heads.dspark import DSparkGQAStages
from moelink.engine.spec.proposer.dspark import load_dspark
from moelink.engine.tools.dspark_checkpoint import agreeing_draft, dspark_config, write_dspark_checkpoint

from tests.helpers.draft_spy import record_drafts
from moelink.engine.tools.dspark_checkpoint import bigram_target

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)

CPU = torch.device("cpu")
TAPS = [0, 2]  # layer outputs (DFlash format): the states after 1 and 3 of the target's 4 layers
MASK = 7


def agreeing(target, out, k: int = 4):
    """engine/tools/dspark_checkpoint.agreeing_draft: the Markov head is the target's bigram, the base logits zero."""
    return agreeing_draft(target, out, block_size=k, target_layer_ids=TAPS, mask_token_id=MASK)


def mixed(target, out, k: int = 4):
    """The agreeing draft with its final norm back at 0.25: the stages' base logits count beside the Markov bigram,
    so drafts depend on the context and are still accepted often."""
    from safetensors.torch import load_file, save_file

    path = agreeing(target, out, k)
    ts = load_file(path / "model.safetensors")
    ts["norm.weight"] = torch.full_like(ts["norm.weight"], 0.25)
    save_file(ts, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def random_draft(target, out, k: int = 4, layers: int = 2):
    cfg = json.loads((target / "config.json").read_text())
    spec = dspark_config(hidden_size=cfg["hidden_size"], vocab_size=cfg["vocab_size"], target_layer_ids=TAPS,
                         num_target_layers=4, mask_token_id=MASK, block_size=k, num_layers=layers)
    return write_dspark_checkpoint(out, spec, seed=5)


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tmp_path_factory):
    from pathlib import Path

    src = Path(tiny_model("qwen3_e6k3", num_layers=4))
    target = bigram_target(src, tmp_path_factory.mktemp("target") / "t", scale=0.1)
    exact = bigram_target(src, tmp_path_factory.mktemp("exact") / "t", scale=0.0)
    return {"target": target, "agree": agreeing(target, tmp_path_factory.mktemp("agree") / "d"), "exact": exact,
            "exact_agree": agreeing(exact, tmp_path_factory.mktemp("exact_agree") / "d"),
            "mixed": mixed(target, tmp_path_factory.mktemp("mixed") / "d"),
            "random": random_draft(target, tmp_path_factory.mktemp("random") / "d")}


def _prompts(vocab: int, n: int = 10, seed: int = 0) -> list[list[int]]:
    """Random prompts; every third starts with the one before's first 12 tokens (prefix-cache hits)."""
    rng = random.Random(seed)
    out: list[list[int]] = []
    for i in range(n):
        p = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 40))]
        out.append(out[-1][:12] + p if i % 3 == 2 and len(out[-1]) >= 12 else p)
    return out


def _generate(path, spec=None, dtype: str = "float32", max_tokens: int = 16, **kw) -> tuple[list, object]:
    # A 32-token budget chunks the longer prompts; 40 blocks of 4 tokens cannot hold all ten requests: preemptions.
    args = dict(dtype=dtype, max_model_len=256, max_num_batched_tokens=32, num_kv_blocks=40, block_size=4,
                enable_prefix_caching=True, speculative_config=spec, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    with LLM(str(path), **args) as llm:
        prompts = _prompts(llm.engine.config.model.vocab_size)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], llm.engine.stats()


def _spec(draft, k: int = 4) -> dict:
    return {"method": "dspark", "model": str(draft), "num_speculative_tokens": k}


@pytest.fixture(scope="module")
def plain(checkpoints):
    cache: dict = {}

    def get(dtype: str = "float32") -> list:
        if dtype not in cache:
            cache[dtype] = _generate(checkpoints["target"], dtype=dtype)[0]
        return cache[dtype]

    return get


@pytest.mark.slow
def test_agreeing_draft_is_accepted_and_outputs_are_exact(checkpoints, plain):
    got, stats = _generate(checkpoints["target"], _spec(checkpoints["agree"]))
    assert got == plain()
    sd = stats.spec_decode
    assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits > 0
    print(f"agreeing DSpark draft: acceptance rate {sd.acceptance_rate:.3f}, per position "
          f"{sd.accepted_per_position}, verify rows {sd.num_verify_rows}")
    assert 0.5 < sd.acceptance_rate < 1.0, sd  # accepted often, rejected too (the target is nearly a bigram)
    assert sd.accepted_per_position[1] > 0.3 * sd.num_verify_rows, sd  # whole runs of a block, not slot 0 alone
    assert sum(sd.accepted_per_position) == sd.num_accepted_tokens


@pytest.mark.slow
def test_a_draft_of_the_exact_bigram_is_accepted_nearly_always(checkpoints):
    got, stats = _generate(checkpoints["exact"], _spec(checkpoints["exact_agree"]))
    assert got == _generate(checkpoints["exact"])[0]
    sd = stats.spec_decode
    print(f"exact-bigram DSpark draft: acceptance rate {sd.acceptance_rate:.3f}")
    assert sd.acceptance_rate > 0.95, sd


@pytest.mark.slow
def test_random_draft_keeps_outputs_exact(checkpoints, plain):
    got, stats = _generate(checkpoints["target"], _spec(checkpoints["random"]))
    assert got == plain()
    sd = stats.spec_decode
    print(f"random DSpark draft: acceptance rate {sd.acceptance_rate:.3f}")
    assert sd.num_verify_rows > 20 and sd.acceptance_rate < 0.3, sd


class _Oracle:
    """The target (transformers, float64) and the draft (float64), run from scratch per question."""

    def __init__(self, target, draft):
        from transformers import AutoModelForCausalLM

        self.hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float64, experts_implementation="eager").eval()
        self.dspark, g = read_dspark_draft(draft)
        self.after = self.dspark.tap_counts(self.hf.config.num_hidden_layers)
        self.seen: dict[int, torch.Tensor] = {}
        mods = list(self.hf.model.layers) + [self.hf.model.norm]  # the stream after n layers enters module n
        for n, mod in enumerate(mods):
            mod.register_forward_pre_hook(self._keeper(n), with_kwargs=True)

        class _Model:  # what load_dspark reads of the served model
            embed_tokens = self.hf.model.embed_tokens.weight.detach()
            lm_head = self.hf.lm_head.weight.detach()

        from moelink.engine.config.model import ModelConfig

        cfg = ModelConfig.from_pretrained(str(target), dtype="float64")
        self.stages, _ = load_dspark(str(draft), cfg, _Model(), None, CPU)
        assert isinstance(self.stages, DSparkGQAStages)

    def _keeper(self, n: int):
        def keep(module, args, kwargs):
            self.seen[n] = (args[0] if args else kwargs["hidden_states"])[0].detach()
        return keep

    @torch.no_grad()
    def drafts(self, tokens: list[int], k: int) -> list[int]:
        """The drafts after `tokens` (x_0 .. x_m, x_m just emitted at position m): context x_0 .. x_{m-1}."""
        m = len(tokens) - 1
        self.hf(torch.tensor([tokens[:m]]))
        taps = [self.seen[n] for n in self.after]
        rows = self.stages.context_rows(taps, torch.arange(m))
        ids = torch.tensor([[tokens[m]] + [MASK] * (k - 1)])
        base = self.stages.base_logits(ids, torch.arange(m, m + k)[None], [r[None] for r in rows],
                                       torch.ones(1, m, dtype=torch.bool))
        prev, out = torch.tensor([tokens[m]]), []
        for i in range(k):
            prev = (base[:, i] + self.stages.markov_bias(prev)).argmax(-1)
            out.append(int(prev))
        return out


@pytest.mark.parametrize("draft", ["random", "mixed"])
@pytest.mark.slow
def test_dspark_drafts_equal_the_draft_run_over_the_whole_sequence(checkpoints, plain, monkeypatch, draft):
    """The random draft (two stages): every draft depends on the paged context of both stages, the anchor's
    position and the block; the mixed one (accepted often): the anchors sit past accepted drafts too. Prefix caching
    is on and preempted requests hit their own blocks."""
    k = 4
    seen = record_drafts(monkeypatch)
    got, stats = _generate(checkpoints["target"], _spec(checkpoints[draft], k), dtype="float64")
    assert got == plain("float64")
    assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits > 0 and len(seen) > 30
    if draft == "mixed":
        print(f"mixed DSpark draft: acceptance rate {stats.spec_decode.acceptance_rate:.3f}")
        assert stats.spec_decode.acceptance_rate > 0.2
    oracle = _Oracle(checkpoints["target"], checkpoints[draft])
    wrong = [(t, d, w) for t, d in seen[::3] if d != (w := oracle.drafts(t, k))]
    assert not wrong, f"{len(wrong)} of {len(seen[::3])} drafts differ, e.g. {wrong[0]}"


def test_block_attention_equals_the_dense_formula(checkpoints):
    """One stage over a block of 3 after 5 context tokens, against attention written out row by row (float64)."""
    dspark, g = read_dspark_draft(checkpoints["random"])
    V, D = g.vocab_size, g.hidden_size
    gen = torch.Generator().manual_seed(1)
    embed, head = torch.randn(V, D, generator=gen, dtype=torch.float64), torch.randn(V, D, generator=gen,
                                                                                     dtype=torch.float64)
    st = DSparkGQAStages(dspark, g, torch.float64, CPU, embed, head)
    for p in st.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3 + (1.0 if p.dim() == 1 else 0))
    stage = st.stages[0]
    x = torch.randn(1, 3, D, generator=gen, dtype=torch.float64)
    ctx_h = torch.randn(5, D, generator=gen, dtype=torch.float64)
    pos_b = torch.tensor([[5, 6, 7]])
    ctx = stage.kv(ctx_h, torch.arange(5))[None]
    valid = torch.tensor([[True, True, True, False, True]])  # one entry masked out
    got = stage(x, pos_b, ctx, valid)

    def rope(v, p):  # neox halves, one angle per pair
        H = v.shape[-1]
        inv = g.rope_theta ** (-torch.arange(0, H, 2, dtype=torch.float64) / H)
        c, s = torch.cos(p * inv), torch.sin(p * inv)
        a, b = v[: H // 2], v[H // 2:]
        return torch.cat([a * c - b * s, b * c + a * s])

    def norm(v, w):
        return v / torch.sqrt(v.pow(2).mean() + g.rms_norm_eps) * w

    N, K, H = g.num_heads, g.num_kv_heads, g.head_dim
    h = torch.stack([norm(r, stage.ln1) for r in x[0]])
    keys, vals = [], []
    for j in range(5):  # the context rows as the cache keeps them: k normed and rotated at their positions
        if valid[0, j]:
            kv = (stage.wk @ ctx_h[j]).view(K, H), (stage.wv @ ctx_h[j]).view(K, H)
            keys.append(torch.stack([rope(norm(kh, stage.k_norm), j) for kh in kv[0]]))
            vals.append(kv[1])
    for b in range(3):
        kv = (stage.wk @ h[b]).view(K, H), (stage.wv @ h[b]).view(K, H)
        keys.append(torch.stack([rope(norm(kh, stage.k_norm), 5 + b) for kh in kv[0]]))
        vals.append(kv[1])
    out = []
    for b in range(3):
        q = (stage.wq @ h[b]).view(N, H)
        heads = []
        for n in range(N):
            qn = rope(norm(q[n], stage.q_norm), 5 + b)
            kvh = n // (N // K)
            s = torch.stack([qn @ kk[kvh] for kk in keys]) / math.sqrt(H)
            heads.append((s.softmax(0)[:, None] * torch.stack([vv[kvh] for vv in vals])).sum(0))
        out.append(stage.wo @ torch.cat(heads))
    y = x[0] + torch.stack(out)
    h2 = torch.stack([norm(r, stage.ln2) for r in y])
    want = y + F.linear(F.silu(h2 @ stage.gate.T) * (h2 @ stage.up.T), stage.down)
    torch.testing.assert_close(got[0], want, rtol=1e-10, atol=1e-10)


def test_config_errors_name_the_field(tmp_path, checkpoints):
    cfg = json.loads((checkpoints["random"] / "config.json").read_text())
    for change, field in [({"markov_head_type": "rnn"}, "markov_head_type"),
                          ({"speculators_model_type": "dspark"}, "speculators_model_type"),
                          ({"dflash_config": {"mask_token_id": 7}}, "target_layer_ids"),
                          ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
                          ({"architectures": ["LlamaForCausalLM"]}, "architectures")]:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=field):
            read_dspark_draft(tmp_path)
    with pytest.raises(ValueError, match="speculative_config.model"):
        SpeculativeConfig.parse({"method": "mtp", "model": "x", "num_speculative_tokens": 2})
    assert SpeculativeConfig.parse({"method": "dspark", "num_speculative_tokens": 5}).runs_dspark
    bundled = read_bundled_dspark({"text_config": {"dspark_block_size": 5, "dspark_noise_token_id": 128799,
                                                   "dspark_target_layer_ids": [37, 38, 39], "dspark_markov_rank": 256,
                                                   "num_nextn_predict_layers": 3}})
    assert bundled.tap_counts(40) == (37, 38, 39) and bundled.num_stages == 3
    from moelink.engine.config.dspark import bundles_dspark
    assert bundles_dspark({"text_config": {"dspark_block_size": 5}}) and not bundles_dspark({"text_config": {}})
    with pytest.raises(ValueError, match="dspark_target_layer_ids"):
        read_bundled_dspark({"dspark_block_size": 5, "dspark_noise_token_id": 1, "dspark_target_layer_ids": [],
                             "dspark_markov_rank": 8, "num_nextn_predict_layers": 1})


def test_a_target_without_dspark_stages_is_refused(checkpoints, tmp_path):
    """No model and no dspark_* fields: refused naming speculative_config.model; dspark_* fields on an
    architecture no family registered DSpark stages for: refused naming the registry."""
    with pytest.raises(ValueError, match="speculative_config.model"):
        LLM(str(checkpoints["target"]), dtype="float32", max_model_len=64, num_kv_blocks=16,
            speculative_config={"method": "dspark", "num_speculative_tokens": 2})
    import shutil

    bundled = tmp_path / "bundled"
    shutil.copytree(checkpoints["target"], bundled)
    cfg = json.loads((bundled / "config.json").read_text())
    cfg.update(dspark_block_size=4, dspark_noise_token_id=MASK, dspark_target_layer_ids=[2, 3], dspark_markov_rank=8,
               num_nextn_predict_layers=1)
    (bundled / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="DSPARK_STAGES"):
        LLM(str(bundled), dtype="float32", max_model_len=64, num_kv_blocks=16,
            speculative_config={"method": "dspark", "num_speculative_tokens": 2})


def test_dspark_drafting_reads_nothing_back_from_the_device(checkpoints, monkeypatch):
    """The drafter's device work (context rows written, accepted offsets, gathers, block, Markov loop) makes no
    device→host sync: counted on CPU by tests.helpers.host_syncs."""
    from moelink.engine.spec.proposer.dspark import DSparkDrafter

    from tests.helpers.host_syncs import HostSyncCounter

    draft = DSparkDrafter.draft
    with HostSyncCounter() as counter:
        def counted(self, *args, **kwargs):
            with counter.counting():
                return draft(self, *args, **kwargs)

        monkeypatch.setattr(DSparkDrafter, "draft", counted)
        _, stats = _generate(checkpoints["target"], _spec(checkpoints["agree"]), max_tokens=8)
    assert stats.spec_decode.num_accepted_tokens > 0
    assert counter.count == 0, counter.where


def test_dummy_draft_and_kv_sizing(checkpoints):
    """load_format "dummy" runs a random draft of the config.json; KV sizing counts its stages' [2, K, H] rows."""
    from moelink.engine.config.model import ModelConfig

    got, stats = _generate(checkpoints["target"], {**_spec(checkpoints["random"]), "num_speculative_tokens": 2},
                           max_tokens=4, load_format="dummy")
    assert len(got) == 10 and stats.spec_decode.num_draft_tokens > 0
    cfg = ModelConfig.from_pretrained(str(checkpoints["target"]), dtype="float32")
    spec = SpeculativeConfig.parse(_spec(checkpoints["random"]))
    _, g = read_dspark_draft(checkpoints["random"])
    assert spec.draft_kv_bytes_per_token(cfg) == g.num_layers * 2 * g.num_kv_heads * g.head_dim * 4


@pytest.mark.slow
def test_rows_drafted_in_groups_draft_the_same(checkpoints, monkeypatch):
    """With the gather budget so small that every row drafts alone, the drafts and outputs are the same."""
    from moelink.engine.spec.proposer import dspark

    spec = _spec(checkpoints["mixed"])
    seen = record_drafts(monkeypatch)
    out_whole, _ = _generate(checkpoints["target"], spec)
    n = len(seen)
    monkeypatch.setattr(dspark, "MAX_GATHERED", 1)
    out_split, _ = _generate(checkpoints["target"], spec)
    assert out_split == out_whole and seen[n:] == seen[:n] and n > 20


@pytest.mark.slow
def test_seeded_sampling_with_dspark_drafts_is_reproducible(checkpoints):
    """Sampled requests verify DSpark's greedy drafts by the rejection rule (engine/spec/rejection.py: deterministic
    drafts keep the target distribution); a seeded request's tokens are the same run after run, drafts accepted."""
    params = SamplingParams(temperature=0.1, seed=11, max_tokens=12, ignore_eos=True, detokenize=False)

    def run():
        with LLM(str(checkpoints["target"]), dtype="float32", max_model_len=128, num_kv_blocks=64, block_size=4,
                 speculative_config={**_spec(checkpoints["agree"]), "min_draft_acceptance": 0}) as llm:
            outs = llm.generate([{"prompt_token_ids": p} for p in _prompts(512, n=4)], params, use_tqdm=False)
            return [o.outputs[0].token_ids for o in outs], llm.engine.stats().spec_decode

    first, sd = run()
    assert run()[0] == first and sd.num_accepted_tokens > 0, sd


def test_a_model_prefixed_draft_loads_and_bad_inventories_are_named(checkpoints, tmp_path):
    """Tensor names with a "model." prefix load as the plain ones; a missing and an unexpected tensor are named."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from moelink.engine.config.model import ModelConfig

    cfg = ModelConfig.from_pretrained(str(checkpoints["target"]), dtype="float32")

    class _Model:
        embed_tokens = torch.zeros(cfg.vocab_size, cfg.hidden_size)
        lm_head = embed_tokens

    plain, _ = load_dspark(str(checkpoints["random"]), cfg, _Model(), None, CPU)
    for name, change in [("prefixed", lambda n, t: {"model." + n: t}),
                         ("missing", lambda n, t: {} if n == "fc.weight" else {n: t}),
                         ("unexpected", lambda n, t: {n: t, **({"extra.weight": t.clone()} if n == "fc.weight" else {})})]:
        d = tmp_path / name
        shutil.copytree(checkpoints["random"], d)
        ts = load_file(d / "model.safetensors")
        save_file({k: v for n, t in ts.items() for k, v in change(n, t).items()}, str(d / "model.safetensors"))
        if name == "prefixed":
            got, _ = load_dspark(str(d), cfg, _Model(), None, CPU)
            assert all(torch.equal(a, b) for a, b in zip(got.parameters(), plain.parameters()))
        else:
            with pytest.raises(ValueError, match="missing 'fc.weight'" if name == "missing" else "unexpected 'extra"):
                load_dspark(str(d), cfg, _Model(), None, CPU)
