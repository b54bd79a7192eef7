"""The byte bound a server refuses long text with must never refuse text that fits (engine/core/prompt_bound.py).

For each tokenizer: either no bound (it may drop or absorb text), or B such
that every text of b bytes encodes to at least b / B tokens, checked on
adversarial texts: runs of the longest token, of characters normalization
shrinks, of unknown characters, and random bytes.
"""
from __future__ import annotations

import json
import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from moelink.engine.core.prompt_bound import NoBound, bytes_per_token

KELVIN, Q_4BYTES, HANGUL_LVT = "\u212a", "\U0001d42a", "\u1100\u1161\u11a8"


def _texts(tok: Tokenizer, rng: random.Random) -> list[str]:
    vocab = tok.get_vocab()
    longest = max(vocab, key=len)
    pieces = [longest, KELVIN, Q_4BYTES, HANGUL_LVT, "q", "qqqq", " ", "\n", "é", "e\u0301", "<s>", "\u2028", "\x00"]
    texts = [p * 300 for p in pieces]
    texts.append("".join(rng.choice(pieces) for _ in range(2000)))
    texts.append(bytes(rng.randrange(256) for _ in range(3000)).decode("utf-8", "replace"))
    texts.append("".join(chr(rng.randrange(0x20, 0x2FFFF)) for _ in range(2000)).encode("utf-8", "replace").decode())
    return texts


def _assert_sound(tok: Tokenizer, rng=None):
    b = bytes_per_token(tok.to_str())
    for text in _texts(tok, rng or random.Random(0)):
        n = len(tok.encode(text).ids)
        assert n * b >= len(text.encode()), (b, n, len(text.encode()), text[:40])
    return b


def _byte_level_bpe(normalizer=None, corpus=("q" * 64 + " hello world") * 50) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator([corpus], trainer)
    return tok


def test_tiny_models_tokenizer_is_bounded_by_its_longest_token(tiny_model):
    from moelink.engine.core.tokenizer import Tokenizer as Ours

    tok = Ours.from_dir(tiny_model("qwen3_e6k3")).backend
    assert _assert_sound(tok) == 13  # "<|endoftext|>"


@pytest.mark.parametrize("normalizer,factor", [
    (None, 1), (normalizers.NFC(), 3), (normalizers.NFKC(), 4), (normalizers.Lowercase(), 3),
    (normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]), 12),
])
def test_normalizers_that_shrink_text_scale_the_bound(normalizer, factor):
    tok = _byte_level_bpe(normalizer)
    longest = max(max(len(t) for t in tok.get_vocab()), len("<|endoftext|>"))
    assert _assert_sound(tok) == factor * longest
    if factor == 4:
        # 𝐪 (U+1D42A, 4 bytes) is "q" after NFKC: with the vocabulary's long "qqq..." tokens, one token stands for 4 times
        # its own length. Without the factor the bound would refuse text that fits.
        text = Q_4BYTES * 640
        assert len(tok.encode(text).ids) * longest < len(text.encode())


def test_metaspace_byte_fallback_tokenizer_is_bounded():
    """Llama-2 / Mistral style: Prepend + Replace normalizer, BPE with byte fallback."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)},
             "▁": 259, "h": 260, "e": 261, "l": 262, "o": 263, "▁h": 264, "he": 265, "ll": 266, "▁he": 267,
             "▁hello": 268, "lo": 269, "llo": 270}
    merges = [("▁", "h"), ("h", "e"), ("l", "l"), ("▁h", "e"), ("l", "o"), ("l", "lo"), ("▁he", "llo")]
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.add_special_tokens(["<s>", "</s>"])
    b = _assert_sound(tok)
    assert b == len("▁hello".encode())


def test_byte_fallback_without_all_256_byte_tokens_falls_back_to_the_unknown_token_rules():
    """A byte whose <0xNN> token is missing becomes <unk>, and with fuse_unk a run of such characters is one
    token: byte_fallback alone proves nothing."""
    vocab = {"<unk>": 0, **{f"<0x{i:02X}>": 1 + i for i in range(0x80)}, "a": 129}
    text = "\u00e9" * 1000  # bytes C3 A9: both missing
    fused = Tokenizer(models.BPE(vocab, [], byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    assert len(fused.encode(text).ids) == 1
    with pytest.raises(NoBound):
        bytes_per_token(fused.to_str())
    # Without fuse_unk each unknown byte is one <unk>: bounded again, by the unknown-character rule.
    _assert_sound(Tokenizer(models.BPE(vocab, [], byte_fallback=True, unk_token="<unk>", fuse_unk=False)))


@pytest.mark.parametrize("case", ["whitespace", "wordpiece", "strip_accents", "lstrip", "truncation",
                                  "no_unk", "fused_unk", "regex_replace", "split_removed"])
def test_tokenizers_that_can_drop_text_have_no_bound(case):
    if case == "whitespace":
        tok = _byte_level_bpe()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()  # spaces vanish: a text of spaces is 0 tokens
    elif case == "wordpiece":
        tok = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))  # [UNK] stands for a whole word
    elif case == "strip_accents":
        tok = _byte_level_bpe(normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()]))
    elif case == "lstrip":
        tok = _byte_level_bpe()
        tok.add_special_tokens([AddedToken("<mask>", lstrip=True)])  # takes every space before it
    elif case == "truncation":
        tok = _byte_level_bpe()
        tok.enable_truncation(16)
    elif case == "no_unk":
        tok = Tokenizer(models.BPE({"a": 0, "b": 1}, []))  # other characters are dropped
    elif case == "fused_unk":
        tok = Tokenizer(models.BPE({"<unk>": 0, "a": 1}, [], unk_token="<unk>", fuse_unk=True))
    elif case == "regex_replace":
        tok = _byte_level_bpe(normalizers.Replace(__import__("tokenizers").Regex(r"\s+"), " "))
    else:
        tok = _byte_level_bpe()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    with pytest.raises(NoBound):
        bytes_per_token(tok.to_str())


def test_byte_level_without_its_full_alphabet_needs_an_unknown_token():
    tok = _byte_level_bpe()
    spec = json.loads(tok.to_str())
    del spec["model"]["vocab"]["Ā"]  # byte 0x00's symbol: that byte would now be dropped
    with pytest.raises(NoBound):
        bytes_per_token(spec)
