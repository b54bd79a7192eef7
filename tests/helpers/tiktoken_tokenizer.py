"""Tiny tokenizers shipped the way Kimi K2 / K2.5 ship theirs (tiktoken.model + tokenizer_config.json, no
tokenizer.json), and tiktoken's encoding written out in plain Python as the oracle (tests/engine/test_tiktoken_tokenizer.py).

`train_ranks`: a byte-level BPE trained on a small corpus (the 256 bytes, ranks 0..255, then the most frequent
adjacent pair of the regex's pieces, one merge a rank), so every multi-byte token is the merge of two tokens, as a
trained tiktoken vocabulary is. `tiktoken_encode`: tiktoken's algorithm (special tokens matched first, the text
between split by the regex with the `regex` module, a piece that is a token taken whole, else its bytes merged at the
adjacent pair of lowest merged rank until none merges), independent of moelink's conversion to a `tokenizers` BPE.
"""
from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

import regex

from moelink.engine.tools.tiny_corpus import corpus_texts

# Kimi's tokenizer_config.json names these ids of the block after the N ranks (offset from N, as K2 publishes:
# 163584 + offset); the rest of the block is <|reserved_token_{id}|>.
KIMI_NAMED = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>", 6: "<|start_header_id|>",
              7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>", 17: "<|im_middle|>", 254: "[UNK]", 255: "[PAD]"}
# Kimi's template, cut down: role tokens, <|im_middle|>, <|im_end|> after each turn.
KIMI_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|im_user|>user<|im_middle|>{% elif m['role'] == "
                 "'system' %}<|im_system|>system<|im_middle|>{% else %}<|im_assistant|>assistant<|im_middle|>{% endif %}"
                 "{{ m['content'] }}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_assistant|>assistant"
                 "<|im_middle|>{% endif %}")


def train_ranks(pattern: str, num_merges: int, texts: list[str] | None = None) -> dict[bytes, int]:
    """The 256 bytes, then `num_merges` merges of the most frequent adjacent pair (ties: the smaller pair)."""
    ranks = {bytes([b]): b for b in range(256)}
    words = Counter()
    for text in texts if texts is not None else corpus_texts():
        for piece in regex.findall(pattern, text, flags=regex.V1):
            words[tuple(bytes([b]) for b in piece.encode())] += 1
    words = dict(words)
    for _ in range(num_merges):
        pairs = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        merged = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    return ranks


def rank_file_text(ranks: dict[bytes, int]) -> str:
    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))


def _bpe(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    if piece in ranks:
        return [ranks[piece]]
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            return [ranks[p] for p in parts]
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def tiktoken_encode(text: str, ranks: dict[bytes, int], specials: dict[str, int], pattern: str) -> list[int]:
    """tiktoken's Encoding.encode(text, allowed_special="all") in plain Python (module docstring)."""
    ids: list[int] = []
    split = regex.compile("(" + "|".join(map(regex.escape, sorted(specials, key=len, reverse=True))) + ")")
    for k, chunk in enumerate(split.split(text) if specials else [text]):
        if k % 2:
            ids.append(specials[chunk])
            continue
        for piece in regex.findall(pattern, chunk, flags=regex.V1):
            ids += _bpe(piece.encode(), ranks)
    return ids


def tiktoken_decode(ids: list[int], ranks: dict[bytes, int], specials: dict[str, int]) -> str:
    inv = {r: t for t, r in ranks.items()} | {i: s.encode() for s, i in specials.items()}
    return b"".join(inv[i] for i in ids).decode("utf-8", errors="replace")


def kimi_specials(num_ranks: int, num_special: int = 258) -> dict[str, int]:
    """text -> id of Kimi's special block after `num_ranks` ranks."""
    return {KIMI_NAMED.get(k, f"<|reserved_token_{num_ranks + k}|>"): num_ranks + k for k in range(num_special)}


def write_kimi_tokenizer(out: Path, ranks: dict[bytes, int], template: str = KIMI_TEMPLATE) -> None:
    """tiktoken.model and tokenizer_config.json as Kimi K2 / K2.5 ship them (auto_map to tokenization_kimi's class,
    the named specials in added_tokens_decoder, [BOS] / [EOS], the chat template); any tokenizer.json is removed."""
    out = Path(out)
    (out / "tokenizer.json").unlink(missing_ok=True)
    (out / "special_tokens_map.json").unlink(missing_ok=True)
    (out / "tiktoken.model").write_text(rank_file_text(ranks))
    n = len(ranks)
    decoder = {str(n + k): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                            "special": True} for k, c in KIMI_NAMED.items()}
    cfg = {"added_tokens_decoder": decoder, "additional_special_tokens": ["<|im_end|>", "<|im_user|>",
                                                                          "<|im_assistant|>", "<|im_system|>",
                                                                          "<|im_middle|>"],
           "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
           "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
           "chat_template": template, "clean_up_tokenization_spaces": False, "model_max_length": 1048576,
           "tokenizer_class": "TikTokenTokenizer"}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
