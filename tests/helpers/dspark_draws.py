"""The draft tensors of a family's bundled DSpark stages for the tiny test checkpoints
(tests/helpers/dsv4_dspark_checkpoint.py, dsv41_dspark_checkpoint.py): random ones shaped by the stages' own weight
plan at one rank, and the Markov head that makes the drafts the target's bigram (`agree`)."""
from __future__ import annotations

import torch

from moelink.engine.config.dspark import read_bundled_dspark
from moelink.engine.config.model import ModelConfig
from moelink.kernels.ops import ReferenceKernels


def draw_stages(stages_cls, cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """A seeded tensor per name of the weight plan of `stages_cls` (the family's DSparkStages, built on the meta
    device at one rank): std 0.2 matrices, norms and hyper-connection scales around 1 (biases, sinks and
    hyper-connection bases around 0)."""
    meta, V, D = torch.device("meta"), cfg.vocab_size, cfg.hidden_size
    plan = stages_cls(cfg, read_bundled_dspark(cfg.hf_config), ReferenceKernels(), meta, torch.empty(V, D, device=meta),
                      torch.empty(V, D, device=meta)).weight_plan()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, entry in plan.items():
        shape = tuple((entry.dest[entry.index] if entry.index else entry.dest).shape)
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        flat = len(shape) == 1 and not name.endswith(("gate.bias", "attn_sink", "_base"))
        out[name] = (1 + 0.1 * t if flat else 0.2 * t).to(entry.dest.dtype)
    return out


def agree(draft: dict, last: str, embed: torch.Tensor, head: torch.Tensor, norm: torch.Tensor, eps: float,
          dtype: torch.dtype) -> None:
    """`draft` made to draft the bigram argmax(head(norm(emb(x)))): the last stage's norm (`last` + "norm.weight")
    zero, so the base logits are zero, and the Markov head W1[x] = norm * rms(emb(x)), W2 = head (rank D)."""
    e = embed.double()
    x = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + eps) * norm.double()
    draft[last + "norm.weight"] = torch.zeros(e.shape[1], dtype=dtype)
    draft[last + "markov_head.markov_w1.weight"] = x.to(dtype)
    draft[last + "markov_head.markov_w2.weight"] = head.to(dtype)


def generate(path: str, spec=None, prompts: int = 6, rounds: int = 1, **kw) -> tuple[list, object]:
    """Greedy tokens of `prompts` seeded random prompts (2-20 tokens, 12 new each; `rounds` times, the last kept)
    served from `path` with `spec` (None: without speculation), and the engine's stats; `kw` over the defaults (a
    32-token step budget: prompts chunk; prefix caching on)."""
    import random

    from moelink.engine import LLM, SamplingParams

    args = dict(dtype="float32", max_model_len=128, max_num_batched_tokens=32, num_kv_blocks=64, block_size=8,
                enable_prefix_caching=True, speculative_config=spec)
    args.update(kw)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, detokenize=False)
    rng = random.Random(0)
    with LLM(path, **args) as llm:
        vocab = llm.engine.config.model.vocab_size
        ps = [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 20))] for _ in range(prompts)]
        for _ in range(rounds):
            outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], llm.engine.stats()


def kv_bytes(path: str, k: int = 3) -> tuple[int, int]:
    """(what the bundled stages' drafter keeps a token, what KV sizing counts for it) for the checkpoint at `path`,
    float32, the stages random (`--load-format dummy`)."""
    from moelink.engine.config.speculative import SpeculativeConfig
    from moelink.engine.spec.proposer.dspark import DSparkDrafter, load_dspark

    cfg = ModelConfig.from_pretrained(path, dtype="float32")

    class _Model:
        embed_tokens = torch.zeros(cfg.vocab_size, cfg.hidden_size)
        lm_head = embed_tokens

    stages, dspark = load_dspark(None, cfg, _Model(), ReferenceKernels(), torch.device("cpu"), load_format="dummy")
    drafter = DSparkDrafter(stages, dspark, cfg, torch.device("cpu"), None, k, 8)
    return drafter.kv_bytes_per_token(), SpeculativeConfig(method="dspark", num_speculative_tokens=k) \
        .draft_kv_bytes_per_token(cfg)


def acceptance(path: str, spec: dict, label: str, **kw):
    """Greedy outputs with `spec` equal to those without (asserted); the run's SpecDecodeCounters, its acceptance
    rate printed under `label`."""
    got, stats = generate(path, spec, **kw)
    assert got == generate(path, None, **kw)[0]
    sd = stats.spec_decode
    print(f"{label}: acceptance rate {sd.acceptance_rate:.3f}")
    return sd
