"""The drafts an MTP drafter must propose, recomputed from scratch (tests/engine/test_spec_decode_mtp.py and the
families' MTP tests): the main model and the MTP layer of a checkpoint in float64 with the reference kernels, each
run over the request's whole sequence (fresh caches, one prefill each), then chained as the drafter chains
(`MTPOracle.all_drafts`: the main model, and the MTP layer's first step, run once per request's longest sequence,
whose first rows are each shorter prefix's, as tests/engine/test_spec_decode_eagle3.py's oracle does; each chained step
after it runs every list's sequence from scratch, side by side in one forward)."""
from __future__ import annotations

import torch

from moelink.engine.config.model import ModelConfig
from moelink.engine.models.layers import ForwardContext
from moelink.engine.rank.loader import load_model
from moelink.engine.spec.proposer.mtp import load_mtp_layer
from moelink.kernels.attention import AttentionMetadata
from moelink.kernels.ops import ReferenceKernels

CPU = torch.device("cpu")


class MTPOracle:
    """The main model and MTP layer of a checkpoint (float64, reference kernels), run from scratch per question.
    `hf_states`: the main model's final-normed states from transformers' own model instead of the engine's (a hybrid
    model: the engine's linear-attention layers need the state pool this oracle does not build; DeepSeek Sparse
    Attention models, whose definition is transformers' forward without a cache)."""

    def __init__(self, path: str, hf_states: bool = False):
        self.cfg = ModelConfig.from_pretrained(path, "float64")
        self.model = load_model(self.cfg, ReferenceKernels(), CPU)
        self.mtp = load_mtp_layer(self.cfg, self.model, ReferenceKernels(), CPU)
        self.hf = None
        if hf_states:
            from tests.helpers.parity import _hf_model

            self.hf = _hf_model(path)  # AutoModelForCausalLM's, or a multimodal checkpoint's own class

    def _states(self, ids: torch.Tensor) -> torch.Tensor:
        if self.hf is not None:
            return self.hf.model(input_ids=ids[None]).last_hidden_state[0]
        return self.model(ids, torch.arange(len(ids)), self._ctx(len(ids)))

    def _ctx(self, n: int) -> ForwardContext:
        """One sequence of n tokens from position 0 over fresh caches (blocks 0.., the null block after)."""
        return self._ctx_many([n])

    def _ctx_many(self, lens: list[int]) -> ForwardContext:
        """Sequences of `lens` tokens, each from position 0 over fresh blocks of its own (one prefill each, side by
        side in one forward; the null block after them all)."""
        bs = 4
        counts = [-(-n // bs) for n in lens]
        blocks = sum(counts)
        caches = [tuple(torch.zeros(s, dtype=torch.float64) for s in self.cfg.attention.cache_shapes(blocks, bs))
                  for _ in range(self.cfg.num_layers + 1)]
        firsts = [sum(counts[:i]) for i in range(len(lens))]
        tables = torch.full((len(lens), max(counts)), blocks, dtype=torch.int32)
        for i, (first, c) in enumerate(zip(firsts, counts)):
            tables[i, :c] = torch.arange(first, first + c, dtype=torch.int32)
        starts = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        slots = torch.cat([first * bs + torch.arange(n) for first, n in zip(firsts, lens)])
        meta = AttentionMetadata(starts, torch.tensor(lens, dtype=torch.int32), tables, slots, list(lens), list(lens),
                                 max(lens), max(lens), null_block=blocks)
        return ForwardContext(meta, caches)

    def _mtp_rows(self, rows_tok: torch.Tensor, rows_h: torch.Tensor) -> torch.Tensor:
        n = len(rows_tok)
        return self.mtp(torch.arange(n), rows_tok, rows_h, self._ctx(n))

    @torch.no_grad()
    def drafts(self, tokens: list[int], k: int, h_TD: torch.Tensor | None = None,
               y1_TD: torch.Tensor | None = None) -> list[int]:
        """What the drafter must propose after `tokens` (x_0 .. x_m, x_m just emitted): rows t = 0 .. m-1 read
        (h_t, x_{t+1}) at position t; each chained step adds a row (the last row's output, the last draft).
        `h_TD`: the main model's states over x_0 .. x_{m-1} (at least m rows; computed here when None). `y1_TD`: the
        first step's MTP outputs over a sequence these tokens begin (at least m rows; computed here when None)."""
        m = len(tokens) - 1
        ids = torch.tensor(tokens)
        h_TD = self._states(ids[:m]) if h_TD is None else h_TD[:m]
        rows_h, rows_tok, out = h_TD, ids[1:], []
        for step in range(k):
            y_TD = y1_TD[:m] if step == 0 and y1_TD is not None else self._mtp_rows(rows_tok, rows_h)
            d = int(self.mtp.compute_logits(y_TD[-1:]).argmax(dim=-1))
            out.append(d)
            rows_h, rows_tok = torch.cat([rows_h, y_TD[-1:]]), torch.cat([rows_tok, torch.tensor([d])])
        return out

    @torch.no_grad()
    def all_drafts(self, seqs: list[list[int]], k: int) -> list[list[int]]:
        """drafts() of each token list, the main model and the MTP layer's first step run from scratch once per
        longest list (one no other list extends) instead of once per list: a causal model's first rows over a
        sequence are its rows over that sequence's prefix (a row reads only the rows before it), so the states and
        first-step outputs of a request's every draft step come from one run over its last. The chained steps after
        the first (each a row the longest list does not hold) still run from scratch per list: every list's sequence
        of a step side by side in one forward, each over caches of its own (_ctx_many)."""
        longest: list[tuple[int, ...]] = []
        for seq in sorted({tuple(s) for s in seqs}, key=len, reverse=True):
            if not any(seq == whole[:len(seq)] for whole in longest):
                longest.append(seq)
        states = {whole: self._states(torch.tensor(whole)) for whole in longest}
        # The first step's rows over the longest list x_0 .. x_M: (h_t, x_{t+1}) for t < M, as drafts() builds them.
        first = {whole: self._mtp_rows(torch.tensor(whole[1:]), states[whole][:len(whole) - 1]) for whole in longest}
        # Each list's chain as drafts() runs it, step by step; a chained step's from-scratch runs (one sequence per
        # list, each from position 0 over caches of its own) go through the layer side by side in one forward.
        chains: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, list[int]]] = {}
        for seq in map(tuple, seqs):
            if seq not in chains:
                whole = next(w for w in longest if seq == w[:len(seq)])
                m = len(seq) - 1
                y_TD = first[whole][:m]
                d = int(self.mtp.compute_logits(y_TD[-1:]).argmax(dim=-1))
                chains[seq] = (torch.cat([states[whole][:m], y_TD[-1:]]), torch.tensor(seq[1:] + (d,)), [d])
        todo = list(chains)
        for _ in range(1, k):
            lens = [len(chains[seq][1]) for seq in todo]
            pos = torch.cat([torch.arange(n) for n in lens])
            y_TD = self.mtp(pos, torch.cat([chains[seq][1] for seq in todo]),
                            torch.cat([chains[seq][0] for seq in todo]), self._ctx_many(lens))
            ends = torch.tensor(lens).cumsum(0)
            for seq, end in zip(todo, ends.tolist()):
                rows_h, rows_tok, out = chains[seq]
                last_1D = y_TD[end - 1:end]
                d = int(self.mtp.compute_logits(last_1D).argmax(dim=-1))
                out.append(d)
                chains[seq] = (torch.cat([rows_h, last_1D]), torch.cat([rows_tok, torch.tensor([d])]), out)
        return [list(chains[tuple(s)][2]) for s in seqs]


__all__ = ["MTPOracle"]


def generate_greedy(path: str, prompts: list[list[int]], spec=None, dtype: str = "float32", max_tokens: int = 16,
                    **kw) -> tuple[list, object]:
    """(each prompt's greedy tokens, the engine's stats) with the MTP tests' engine: a 32-token budget chunks the
    longer prompts, and 40 blocks of 4 tokens cannot hold ten requests at once (preemptions). `spec`: the
    speculative_config (None: plain decoding); `kw`: more LLM arguments."""
    from moelink.engine import LLM, SamplingParams

    args = dict(dtype=dtype, max_model_len=256, max_num_batched_tokens=32, num_kv_blocks=40, block_size=4,
                speculative_config=spec)
    args.update(kw)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    with LLM(path, **args) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], llm.engine.stats()

