"""`moelink train-builtin-model OUT`: train the built-in model (builtin-model/) on the stdlib's docstrings.

The built-in model is what `make serve` serves: a tiny Qwen3-MoE that writes English-looking words, so that
trying the API shows text rather than random bytes. It is trained here, on CPU, in minutes:
- corpus: the docstrings of the running Python's standard library (builtin_corpus.py), one held-out
  document in `HELD_OUT_EVERY` for the held-out loss;
- tokenizer: byte-level BPE on that corpus with the specials and ChatML template of tiny_corpus.py;
- model: transformers' own `Qwen3MoeForCausalLM`, trained with plain torch AdamW (warmup, then cosine
  decay) on packed windows of `seq_len` tokens, with its load-balancing loss so every expert gets used;
- files: `save_pretrained` (config.json, model.safetensors, generation_config.json) + tokenizer files, a
  word list of the corpus (the word-ratio test's dictionary), a model card and `moelink_builtin.json`
  (what the server's banner says about it).

The run is a fixed number of steps and deterministic given the seed (one generator for init and batch
order, a fixed thread count). Shape legend: N windows, B batch, S window length.
"""
from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from .builtin_corpus import Doc, chat_text, corpus_words, prose_text, stdlib_docs
from .builtin_model import DESCRIPTION, MARKER_FILE
from .file_modes import umask_mode
from .tiny_corpus import EOS_TOKEN, IM_END, train_bpe_tokenizer, write_tokenizer_configs

HELD_OUT_EVERY = 50   # document i is held out when i % 50 == 0
CHAT_EVERY = 3        # one qualifying definition in 3 also gets a ChatML question-and-answer document
WORDS_FILE = "words.txt"
MIN_WORD_COUNT = 2    # words seen fewer times are more likely typos or identifiers


@dataclass(frozen=True)
class TrainConfig:
    """What one training run is; the defaults made builtin-model/."""

    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 5e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int = 96
    max_position_embeddings: int = 1024
    router_aux_loss_coef: float = 0.01
    eval_every: int = 100
    threads: int = 2
    max_files: Optional[int] = None  # read only the first N stdlib source files (the smoke test)

    def __post_init__(self):
        def fail(name, allowed):
            raise ValueError(f"train-builtin-model: {name}={getattr(self, name)!r} is invalid: {allowed}.")

        for name in ("steps", "batch_size", "seq_len", "vocab_size", "hidden_size", "num_layers", "num_heads",
                     "num_kv_heads", "num_experts", "top_k", "moe_intermediate_size", "max_position_embeddings",
                     "eval_every", "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                fail(name, "must be a positive integer")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps < self.steps:
            fail("warmup_steps", f"must be an integer in [0, steps={self.steps})")
        for name in ("lr", "weight_decay", "router_aux_loss_coef"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0 or (name == "lr" and v == 0):
                fail(name, "must be a number > 0" if name == "lr" else "must be a number >= 0")
        if self.vocab_size < 300:
            fail("vocab_size", "must be >= 300 (256 byte tokens + specials + merges)")
        if self.top_k > self.num_experts:
            fail("top_k", f"must be <= num_experts ({self.num_experts})")
        if self.hidden_size % self.num_heads:
            fail("hidden_size", f"must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            fail("num_heads", f"must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.seq_len > self.max_position_embeddings:
            fail("seq_len", f"must be <= max_position_embeddings ({self.max_position_embeddings})")
        if self.max_files is not None and (not isinstance(self.max_files, int) or self.max_files < 1):
            fail("max_files", "must be None or a positive integer")


def split_documents(docs: list[Doc]) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): prose of every document, plus a ChatML turn for some."""
    train, held = [], []
    qualifying = 0
    for i, doc in enumerate(docs):
        texts = [prose_text(doc)]
        chat = chat_text(doc)
        if chat is not None:
            if qualifying % CHAT_EVERY == 0:
                texts.append(chat)
            qualifying += 1
        (held if i % HELD_OUT_EVERY == 0 else train).extend(texts)
    return train, held


def pack(tokenizer, texts: list[str], seq_len: int):
    """Token windows [N, S] (int64): the texts encoded, each followed by <|endoftext|>, concatenated and
    cut into non-overlapping windows; the remainder that fills no window is dropped."""
    import torch

    eos = tokenizer.token_to_id(EOS_TOKEN)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"train-builtin-model: the corpus ({len(ids)} tokens) fills no window of seq_len = "
                         f"{seq_len} tokens: read more files (max_files) or lower seq_len.")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def build_model(cfg: TrainConfig, special_ids: dict[str, int]):
    """transformers' Qwen3MoeForCausalLM on the built-in shape, initialised from the run's seed."""
    import torch
    from transformers import GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    eos, im_end = special_ids[EOS_TOKEN], special_ids[IM_END]
    hf_cfg = Qwen3MoeConfig(  # type: ignore[call-arg]  # head_dim: a field its __init__ does not name; kept, read
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads, num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k, moe_intermediate_size=cfg.moe_intermediate_size,
        intermediate_size=2 * cfg.moe_intermediate_size, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=1e-6,
        tie_word_embeddings=False, router_aux_loss_coef=cfg.router_aux_loss_coef, output_router_logits=True,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    hf_cfg.architectures = ["Qwen3MoeForCausalLM"]
    torch.manual_seed(cfg.seed)
    model = Qwen3MoeForCausalLM(hf_cfg)
    # Chat turns end with <|im_end|>, plain text with <|endoftext|>: both stop. Sampling defaults for
    # clients that read them; greedy decoding of so small a model soon repeats itself.
    model.generation_config = GenerationConfig(
        bos_token_id=eos, eos_token_id=[eos, im_end], pad_token_id=eos, do_sample=True, temperature=0.7,
        top_p=0.9)
    return model


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    done = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))  # cosine down to a tenth


def held_out_loss(model, windows_NS, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over the held-out windows, without the router's aux loss."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows_NS), batch_size):
            w = windows_NS[i:i + batch_size]
            logits = model(input_ids=w, output_router_logits=False).logits[:, :-1]
            total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()  # host sync
            count += w[:, 1:].numel()
    model.train()
    return total / count


def train(out_dir, cfg: TrainConfig = TrainConfig(), log=print) -> dict:
    """Train the built-in model and write it to `out_dir`; returns the run's record (also in the marker file)."""
    import torch

    # The run's own thread count, given back after: `train` is a library call too (the CLI's, a test's), and a
    # process left at cfg.threads runs everything after it on that many threads (two such processes on two cores
    # spin OpenMP barriers against each other).
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(out_dir, cfg, log)
    finally:
        torch.set_num_threads(threads_before)


def _train(out_dir, cfg: TrainConfig, log) -> dict:
    import torch

    t0 = time.monotonic()
    docs = list(stdlib_docs(max_files=cfg.max_files))
    train_texts, held_texts = split_documents(docs)
    if not held_texts:
        raise ValueError("train-builtin-model: no held-out document: read more files (max_files).")
    tokenizer = train_bpe_tokenizer(train_texts, cfg.vocab_size)
    special_ids = {t: tokenizer.token_to_id(t) for t in (EOS_TOKEN, IM_END)}
    train_NS, held_NS = pack(tokenizer, train_texts, cfg.seq_len), pack(tokenizer, held_texts, cfg.seq_len)
    log(f"corpus: {len(docs)} docstrings of Python {platform.python_version()}, "
        f"{train_NS.numel()} training / {held_NS.numel()} held-out tokens, vocab {tokenizer.get_vocab_size()}")

    model = build_model(cfg, special_ids)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norms
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train_NS), generator=gen)
    pos, history = 0, []
    t_train = time.monotonic()
    model.train()
    for step in range(cfg.steps):
        if pos >= len(order):  # a new epoch, a new order
            order, pos = torch.randperm(len(train_NS), generator=gen), 0
        batch_BS = train_NS[order[pos:pos + cfg.batch_size]]
        pos += cfg.batch_size
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        out = model(input_ids=batch_BS, labels=batch_BS)  # transformers shifts the labels itself
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            held = held_out_loss(model, held_NS, cfg.batch_size)
            history.append({"step": step + 1, "train_loss": round(out.loss.item(), 4), "held_out_loss": round(held, 4)})
            log(f"step {step + 1}/{cfg.steps}: train loss {out.loss.item():.3f} (with aux), held-out {held:.3f}, "
                f"{time.monotonic() - t_train:.0f} s")
    wall = time.monotonic() - t0
    record = {"description": DESCRIPTION, "command": command_for(cfg, Path(out_dir).name),
              "python": platform.python_version(), "parameters": n_params,
              "training_tokens": cfg.steps * cfg.batch_size * cfg.seq_len, "wall_seconds": round(wall, 1),
              "final_held_out_loss": history[-1]["held_out_loss"], "history": history, "config": asdict(cfg)}
    _save(Path(out_dir), model, tokenizer, train_texts, cfg, record)
    log(f"wrote {out_dir}: {n_params} parameters, {wall:.0f} s")
    return record


def _save(out: Path, model, tokenizer, train_texts: list[str], cfg: TrainConfig, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False  # a training switch; inference has no use for it
    model.save_pretrained(out)
    umask_mode(out.glob("*.safetensors"))
    tokenizer.save(str(out / "tokenizer.json"))
    write_tokenizer_configs(out, tokenizer, cfg.max_position_embeddings)
    words = corpus_words(train_texts)
    (out / WORDS_FILE).write_text("".join(f"{w}\n" for w in sorted(words) if words[w] >= MIN_WORD_COUNT))
    (out / MARKER_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (out / "README.md").write_text(model_card(record, out.name))


def command_for(cfg: TrainConfig, out_name: str) -> str:
    """The `moelink train-builtin-model` command line that repeats a run (flags that differ from defaults)."""
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items() if v != getattr(TrainConfig(), k)]
    return " ".join(["moelink train-builtin-model", out_name, *flags])


def model_card(record: dict, out_name: str) -> str:
    cfg = record["config"]
    c = TrainConfig(**cfg)
    rows = "\n".join(f"| {h['step']} | {h['train_loss']:.3f} | {h['held_out_loss']:.3f} |" for h in record["history"])
    return f"""# The built-in model of moelink

{DESCRIPTION[0].upper() + DESCRIPTION[1:]}. `make serve` serves it, so that
trying the API shows words rather than random bytes; for a real model, serve a Hugging Face checkpoint
(`moelink serve Qwen/Qwen3-30B-A3B`).

- Made by: `{command_for(c, out_name)}` (engine/tools/train_builtin.py), on CPU with
  {cfg['threads']} threads, seed {cfg['seed']}: {cfg['steps']} steps of {cfg['batch_size']} x {cfg['seq_len']} tokens ({record['training_tokens']} tokens), AdamW, lr {cfg['lr']} (warmup {cfg['warmup_steps']}, cosine to a tenth);
  {record['wall_seconds'] / 60:.1f} wall minutes (corpus and tokenizer included) on a 2-core machine shared with other jobs.
- Corpus: the docstrings of the Python {record['python']} standard library, read with `ast` (no module
  imported); one document in {HELD_OUT_EVERY} held out. Another Python version gives a slightly different corpus.
- Model: transformers' `Qwen3MoeForCausalLM`, {record['parameters']} parameters in float32: {cfg['num_layers']} layers, hidden {cfg['hidden_size']},
  {cfg['num_heads']} query / {cfg['num_kv_heads']} KV heads, {cfg['num_experts']} experts of width {cfg['moe_intermediate_size']}, top-{cfg['top_k']}; byte-level BPE of {cfg['vocab_size']} tokens
  with the ChatML template (chat turns end with `<|im_end|>`, text with `<|endoftext|>`).
- Final held-out loss: {record['final_held_out_loss']:.2f} nats per token.
- Files: what `save_pretrained` writes, the tokenizer files, `words.txt` (corpus words seen at least
  {MIN_WORD_COUNT} times: the dictionary of tests/engine/test_builtin_model.py) and `{MARKER_FILE}` (this
  run's record; the server's start-up banner reads it).

| step | training loss (with router aux loss) | held-out loss |
|---|---|---|
{rows}
"""


def register_cli(subparsers) -> None:
    """Add `train-builtin-model OUT ...` (every TrainConfig field as a flag) to an argparse subparsers object."""
    p = subparsers.add_parser("train-builtin-model", help="train the built-in model (builtin-model/) on CPU from "
                              "the standard library's docstrings", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output directory (builtin-model to replace the committed one)")
    for name, default in asdict(TrainConfig()).items():
        kind = int if name == "max_files" else type(default)
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)
    p.set_defaults(func=_run_cli)


def _run_cli(ns) -> None:
    fields = {name: getattr(ns, name) for name in asdict(TrainConfig())}
    train(ns.out, TrainConfig(**fields), log=lambda msg: print(msg, file=sys.stderr, flush=True))
