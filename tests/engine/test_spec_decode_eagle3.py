"""Speculative decoding with an EAGLE-3 head (method "eagle3", engine/spec/proposer/eagle3.py), one rank.

- Greedy outputs with EAGLE-3 drafts are token-identical to decoding without speculation (Qwen3-MoE, Mixtral and
  DeepSeek-V3 tiny targets), k = 1 and 3, with chunked prefill, preemption and prefix caching in play, with a head
  built to guess the target's next token (tests.helpers.eagle3_heads.bigram_head), so drafts are accepted often
  and rejected too.
- Every draft the engine produced equals an independent recomputation: the target run from scratch by
  transformers in float64 over the request's whole sequence (its residual stream read by hooks at the inputs of
  the head's aux layers, or of the final norm; run once over the longest sequence a request was asked about: the
  target is causal, so a shorter question of that request reads its prefix of those states), the head run over
  every row from position 0 on fresh caches, then
  chained as the drafter chains (its own output state and its last draft, one position on); on a random head
  (own embedding, a draft vocabulary, a head narrower than the target) and on the bigram head.
- The drafter's device work makes no device→host sync (counted on CPU).
- load_format "dummy" runs a random head; KV sizing counts its own GQA cache layer; bad heads are refused naming
  speculative_config.model.
"""
from __future__ import annotations

from types import SimpleNamespace

import random

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.config.engine_args import EngineArgs
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.layers import ForwardContext
from moelink.engine.spec.proposer import chain
from moelink.engine.spec.proposer.eagle3_loader import load_eagle3_head
from moelink.engine.rank.step_plan import TwoBatchOverlap
from moelink.engine.tools.eagle3_checkpoint import write_eagle3_checkpoint
from moelink.kernels.ops import ReferenceKernels

from tests.helpers.draft_spy import record_drafts
from tests.helpers.eagle3_heads import bigram_head, scaled_target
from tests.helpers.paged_meta import paged_meta
from tests.helpers.mtp_checkpoints import make_mtp_model

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)

CPU = torch.device("cpu")
# The targets and the aux layer ids their heads name: Qwen3 (4 layers) takes the default rule (the inputs of
# layers 2, 2, 1); Mixtral (4 layers) names layer outputs 0, 1, 3 (states after 1, 2 and all 4 layers: the last
# before the final norm); DeepSeek-V3 (2 layers, MLA, with an MTP layer the head leaves alone) 0, 0, 1.
TARGETS = {"qwen3": ("qwen3_e6k3", None), "mixtral": ("mixtral_e5k3", [0, 1, 3]), "dsv3": ("deepseek_v3", [0, 0, 1])}


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tmp_path_factory):
    """checkpoints(target, head) → (target path, head path): the scaled target and its "bigram" head, or a
    "random" head (write_eagle3_checkpoint: own embedding, 200-token draft vocabulary, hidden 32 under a target
    of 64)."""
    built: dict = {}

    def get(target: str, head: str) -> tuple[str, str]:
        name, aux = TARGETS[target]
        if target not in built:
            src = (make_mtp_model(tmp_path_factory.mktemp(target) / "src", name) if target == "dsv3"
                   else tiny_model(name, num_layers=4))
            built[target] = scaled_target(src, tmp_path_factory.mktemp(target) / "t")
        if (target, head) not in built:
            out = tmp_path_factory.mktemp(f"{target}_{head}") / "head"
            cfg = ModelConfig.from_pretrained(built[target])
            built[target, head] = (bigram_head(built[target], out, aux_layer_ids=aux) if head == "bigram" else
                                   write_eagle3_checkpoint(out, vocab_size=cfg.vocab_size, draft_vocab_size=200,
                                                           target_hidden_size=cfg.hidden_size, seed=3,
                                                           aux_layer_ids=aux, max_position_embeddings=64))
        return str(built[target]), str(built[target, head])

    return get


def _prompts(vocab: int, n: int = 10, seed: int = 0) -> list[list[int]]:
    """Random prompts; every third starts with the one before's first 12 tokens (prefix-cache hits across
    requests)."""
    rng = random.Random(seed)
    out: list[list[int]] = []
    for i in range(n):
        p = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 40))]
        out.append(out[-1][:12] + p if i % 3 == 2 and len(out[-1]) >= 12 else p)
    return out


def _generate(path: str, spec=None, dtype: str = "float32", max_tokens: int = 16, step_plan=None,
              **kw) -> tuple[list, object]:
    # A 32-token budget chunks the longer prompts; 40 blocks of 4 tokens cannot hold all ten requests: preemptions.
    args = dict(dtype=dtype, max_model_len=256, max_num_batched_tokens=32, num_kv_blocks=40, block_size=4,
                enable_prefix_caching=True, speculative_config=spec)
    args.update(kw)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    with LLM(path, **args) as llm:
        if step_plan is not None:  # one rank in-process: the plan runs every stage, no all-to-all
            llm.engine.executor.worker.runner.step_plan = step_plan
        prompts = _prompts(llm.engine.config.model.vocab_size)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], llm.engine.stats()


def _spec(head: str, k: int) -> dict:
    return {"method": "eagle3", "model": head, "num_speculative_tokens": k}


@pytest.fixture(scope="module")
def plain(checkpoints):
    cache: dict = {}

    def get(target: str, dtype: str = "float32") -> list:
        if (target, dtype) not in cache:
            cache[target, dtype] = _generate(checkpoints(target, "bigram")[0], dtype=dtype)[0]
        return cache[target, dtype]

    return get


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_greedy_with_eagle3_drafts_equals_plain_decoding(checkpoints, plain, target, k):
    path, head = checkpoints(target, "bigram")
    got, stats = _generate(path, _spec(head, k))
    assert got == plain(target)
    sd = stats.spec_decode
    assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits > 0
    # Accepted often (the bigram head), rejected too; the counters agree with each other.
    assert 0.3 < sd.acceptance_rate < 1.0, sd
    assert sd.accepted_per_position[0] > 0.5 * sd.num_verify_rows, sd
    assert sum(sd.accepted_per_position) == sd.num_accepted_tokens
    assert sd.num_verify_rows <= sd.num_draft_tokens <= k * sd.num_verify_rows


class _Oracle:
    """The target (transformers, float64) and the head (float64, reference kernels), run from scratch per question
    (module docstring)."""

    def __init__(self, path: str, head_path: str, questions: list[list[int]] = ()):
        from transformers import AutoModelForCausalLM

        from moelink.engine.config.eagle3 import eagle3_aux_layers, read_eagle3_config

        self.hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
        L = self.hf.config.num_hidden_layers
        self.after = eagle3_aux_layers(read_eagle3_config(head_path), L)
        self.seen: dict[int, torch.Tensor] = {}
        # The residual stream after n layers is the input of layer n (of the final norm for n = L).
        mods = list(self.hf.model.layers) + [self.hf.model.norm]
        for n, mod in enumerate(mods):
            mod.register_forward_pre_hook(self._keeper(n), with_kwargs=True)
        embed = self.hf.model.embed_tokens.weight.detach()
        self.head = load_eagle3_head(head_path, ReferenceKernels(), CPU, dtype=torch.float64, kv_cache_index=0,
                                     embed_tokens=embed, lm_head=self.hf.lm_head.weight.detach(), max_positions=256)
        # (target tokens, their residual streams by n) of each transformers run; longest first, so that every
        # question whose tokens one run starts with reads that run's rows.
        self.runs: list[tuple[tuple[int, ...], dict[int, torch.Tensor]]] = []
        for tokens in sorted({tuple(q[:-1]) for q in questions}, key=len, reverse=True):
            self._states(tokens)

    def _keeper(self, n: int):
        def keep(module, args, kwargs):
            self.seen[n] = (args[0] if args else kwargs["hidden_states"])[0].detach()
        return keep

    @torch.no_grad()
    def _states(self, tokens: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """The residual streams after n layers over `tokens` (n in self.after): the rows of a run over a sequence
        that starts with them, else of a run over them."""
        for seq, states in self.runs:
            if seq[:len(tokens)] == tokens:
                return {n: st[:len(tokens)] for n, st in states.items()}
        self.hf(torch.tensor([tokens]))
        states = {n: self.seen[n].clone() for n in set(self.after)}
        self.runs.append((tokens, states))
        return states

    def _ctx(self, lens: list[int]) -> ForwardContext:
        """Sequences of `lens` tokens, each from position 0 over fresh head cache blocks of its own (blocks 0.., the
        null block after them all)."""
        counts = [-(-n // 4) for n in lens]
        firsts = [sum(counts[:i]) for i in range(len(lens))]
        blocks = sum(counts)
        cache = tuple(torch.zeros(s, dtype=torch.float64) for s in self.head.cfg.attention.cache_shapes(blocks, 4))
        tables = [list(range(a, a + c)) for a, c in zip(firsts, counts)]
        return ForwardContext(paged_meta([0] * len(lens), list(lens), tables, blocks, 4), [cache])

    @torch.no_grad()
    def drafts(self, questions: list[list[int]], k: int) -> list[list[int]]:
        """What the drafter must propose after each question's `tokens` (x_0 .. x_m, x_m just emitted): rows t = 0 ..
        m-1 read (fc(states at t), x_{t+1}) at position t; each chained step adds a row (the last row's output, the
        last draft). Each step runs every question's sequence from scratch, side by side in one forward."""
        chains: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, list[int]]] = {}
        for tokens in map(tuple, questions):
            if tokens not in chains:
                m = len(tokens) - 1
                states = self._states(tokens[:m])
                chains[tokens] = (self.head.combine_hidden(*(states[n] for n in self.after)),
                                  torch.tensor(tokens[1:]), [])
        todo = list(chains)
        for _ in range(k):
            lens = [len(chains[q][1]) for q in todo]
            y_TD = self.head(torch.cat([torch.arange(n) for n in lens]), torch.cat([chains[q][1] for q in todo]),
                             torch.cat([chains[q][0] for q in todo]), self._ctx(lens))
            for q, end in zip(todo, torch.tensor(lens).cumsum(0).tolist()):
                rows_h, rows_tok, out = chains[q]
                last_1D = y_TD[end - 1:end]
                d = int(self.head.to_target_ids(self.head.compute_logits(last_1D).argmax(dim=-1)))
                out.append(d)
                chains[q] = (torch.cat([rows_h, last_1D]), torch.cat([rows_tok, torch.tensor([d])]), out)
        return [list(chains[tuple(q)][2]) for q in questions]


@pytest.mark.parametrize("target,head,plan", [("qwen3", "random", "single"), ("mixtral", "random", "single"),
                                              ("mixtral", "bigram", "single"), ("dsv3", "random", "single"),
                                              ("qwen3", "random", "two_batch")])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_eagle3_drafts_equal_the_head_run_over_the_whole_sequence(checkpoints, plain, target, head, plan,
                                                                  monkeypatch):
    """Random heads: drafts depend on every part of the head (its KV cache, the three captured states through fc)
    but are seldom accepted; the bigram head: accepted often, so the accepted lengths (which position drafts) are
    in play too. Prefix caching is on, prompts share prefixes and preempted requests hit their own blocks: a hit
    block's last slot holds the head's state for the token after it, which its hash covers (block_hash_lookahead),
    so a from-scratch run must give the same drafts. "two_batch": the forward runs as two micro-batches
    (engine/rank/step_plan.TwoBatchOverlap), each capturing its own states, joined back."""
    path, head_path = checkpoints(target, head)
    k = 3
    seen = record_drafts(monkeypatch)
    # Scratch for one row at first: steps with more rows grow the head's cache (its real blocks kept) mid-run.
    monkeypatch.setattr(chain, "SCRATCH_ROWS", 1)
    got, stats = _generate(path, _spec(head_path, k), dtype="float64",
                           step_plan=TwoBatchOverlap() if plan == "two_batch" else None)
    assert got == plain(target, "float64")
    assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits > 0 and len(seen) > 50
    if head == "bigram":
        assert stats.spec_decode.acceptance_rate > 0.3
    oracle = _Oracle(path, head_path, [tokens for tokens, _ in seen])
    wants = oracle.drafts([tokens for tokens, _ in seen], k)
    wrong = [(tokens, drafts, want) for (tokens, drafts), want in zip(seen, wants) if drafts != want]
    assert not wrong, f"{len(wrong)} of {len(seen)} drafts differ, e.g. {wrong[0]}"


def test_eagle3_drafting_reads_nothing_back_from_the_device(checkpoints, monkeypatch):
    """The drafter's device work (catch-up from the captured states, accepted offsets, chain) makes no
    device→host sync: counted on CPU by tests.helpers.host_syncs."""
    from moelink.engine.spec.proposer.eagle3 import Eagle3Drafter

    from tests.helpers.host_syncs import HostSyncCounter

    draft = Eagle3Drafter.draft
    with HostSyncCounter() as counter:
        def counted(self, *args, **kwargs):
            with counter.counting():
                return draft(self, *args, **kwargs)

        monkeypatch.setattr(Eagle3Drafter, "draft", counted)
        path, head = checkpoints("qwen3", "bigram")
        _, stats = _generate(path, _spec(head, 3), max_tokens=8)
    assert stats.spec_decode.num_accepted_tokens > 0
    assert counter.count == 0, counter.where


@pytest.mark.parametrize("extra", [dict(quantization="fp8", fp8_block_size=[16, 16]), dict(kv_cache_dtype="fp8")],
                         ids=["fp8_weights", "fp8_kv_cache"])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_fp8_target_and_kv_cache(checkpoints, extra):
    """An FP8 target (the head stays float: its linears are FloatLinear), or every cache layer in fp8, the head's
    included."""
    path, head = checkpoints("qwen3", "bigram")
    want, _ = _generate(path, max_tokens=8, **extra)
    got, stats = _generate(path, _spec(head, 2), max_tokens=8, **extra)
    assert got == want and stats.spec_decode.num_accepted_tokens > 0


def test_dummy_weights_run_the_head(checkpoints):
    path, head = checkpoints("mixtral", "random")
    want, _ = _generate(path, load_format="dummy", max_tokens=6)
    got, stats = _generate(path, _spec(head, 2), load_format="dummy", max_tokens=6)
    assert got == want and stats.spec_decode.num_draft_tokens > 0


def test_head_rope_covers_the_targets_max_model_len(checkpoints):
    """The head was trained at 64 positions (its max_position_embeddings); the target runs 300: so does its rope."""
    path, head = checkpoints("qwen3", "random")
    with LLM(path, dtype="float32", max_model_len=300, num_kv_blocks=64, block_size=4,
             speculative_config=_spec(head, 2)) as llm:
        drafter = llm.engine.executor.worker.runner.plugin("speculative").device
        assert drafter.layer.self_attn.rope.table_PR.shape[0] == 300 and drafter.aux_layers == (2, 2, 1)
        prompt = list(range(3, 103))  # positions past 64
        out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=4),
                           use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4


def test_graphs_are_not_captured_for_a_head(checkpoints):
    """A captured forward keeps no aux states (ForwardContext.aux is eager-only): with eagle3 the runner captures
    no decode or verify graph, and every step runs eagerly (the others stay as they were)."""
    from moelink.engine.config.speculative import SpeculativeConfig
    from moelink.engine.rank.cuda_graph import EagerReplay
    from moelink.engine.rank.model_runner import ModelRunner
    from moelink.engine.contract.step_plugin import step_plugins
    from moelink.engine.spec.step_plugin import FEATURE

    path, head = checkpoints("qwen3", "random")
    cfg = ModelConfig.from_pretrained(path, "float32")
    for spec, sizes in ((None, (1, 2)), (_spec(head, 2), ())):
        config = SimpleNamespace(speculative=SpeculativeConfig.parse(spec))  # the worker's, as the feature reads it
        runner = ModelRunner(cfg, 4, None, CPU, kernels="triton", cuda_graph_sizes=(1, 2), graph_backend=EagerReplay(),
                             plugins=lambda rank: step_plugins((FEATURE,), rank, config))
        assert runner.graph_sizes == sizes


def test_kv_sizing_counts_the_head_cache_layer(checkpoints):
    """The head's cache is its own GQA shape (2 kv heads x 8 dims: 32 values a token), not a target layer's."""
    path, head = checkpoints("qwen3", "random")
    target = ModelConfig.from_pretrained(path).attention.kv_bytes_per_token(torch.float32)
    assert target == 2 * 2 * 16 * 4  # K and V, 2 kv heads of 16 dims, float32: four layers of these
    budget = 100 * 4 * (4 * target + 2 * 2 * 8 * 4)  # 100 blocks of 4 tokens, target and head layers

    def blocks(spec) -> int:
        args = EngineArgs(path, dtype="float32", block_size=4, kv_cache_memory_bytes=budget, speculative_config=spec)
        return args.create_engine_config().cache.num_kv_blocks

    assert blocks(_spec(head, 2)) == 100
    assert blocks(None) == budget // (4 * 4 * target)


def test_bad_heads_are_refused_naming_the_field(checkpoints, tmp_path):
    path, _ = checkpoints("qwen3", "bigram")
    with pytest.raises(ValueError, match=r"speculative_config\.model='/nowhere' is neither a local directory"):
        EngineArgs(path, speculative_config=_spec("/nowhere", 1)).create_engine_config()
    other = write_eagle3_checkpoint(tmp_path / "other", vocab_size=96, target_hidden_size=64)
    with pytest.raises(ValueError, match=r"speculative_config\.model: the EAGLE-3 head's config\.json vocab_size=96 "
                                         r"differs from the served model's vocab_size=512"):
        EngineArgs(path, speculative_config=_spec(str(other), 1)).create_engine_config()
    narrow = write_eagle3_checkpoint(tmp_path / "narrow", vocab_size=512)
    with pytest.raises(ValueError, match=r"target_hidden_size=32 differs from the served model's hidden_size=64"):
        EngineArgs(path, speculative_config=_spec(str(narrow), 1)).create_engine_config()
    deep = write_eagle3_checkpoint(tmp_path / "deep", vocab_size=512, target_hidden_size=64, aux_layer_ids=[1, 2, 7])
    with pytest.raises(ValueError, match=r"after layers \[2, 3, 8\] do not exist in a target of 4 layers"):
        EngineArgs(path, speculative_config=_spec(str(deep), 1)).create_engine_config()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"speculative_config\.model='.*empty': EAGLE-3 head .* has no config\.json"):
        EngineArgs(path, speculative_config=_spec(str(tmp_path / "empty"), 1)).create_engine_config()
