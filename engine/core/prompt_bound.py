"""How much text can possibly fit in N tokens, read from the tokenizer's own definition.

A server that tokenizes a 16 MB prompt only to find it far longer than
max_model_len has already spent ~18 s of CPU and gigabytes of memory on it.
`bytes_per_token` gives B such that *every* token a text encodes to stands for
at most B bytes of that text (UTF-8). A text of more than
(max_model_len - 1) * B bytes therefore encodes to more than max_model_len - 1
tokens, whatever it says, and can be refused before it is tokenized. The
bound must never refuse a prompt that fits, so it holds only where the
tokenizer's definition proves it:

1. Nothing of the text is dropped or absorbed unboundedly: each byte of the
   normalized text ends up in exactly one token. True for the ByteLevel (with
   all 256 byte symbols in the vocab) and Metaspace pre-tokenizers, regex
   splits that keep what they match, BPE / Unigram models that fall back to
   bytes or to one unknown token per character. False, and then there is no
   bound (None), for pre-tokenizers that drop whitespace, models whose
   unknown token swallows whole words (WordPiece, WordLevel, fused unknowns),
   added tokens that strip surrounding whitespace, or a truncating tokenizer.
2. One token covers at most L bytes of normalized text: L is the longest
   token in the vocabulary or among the added tokens (characters for the
   ByteLevel alphabet, where one symbol is one byte; UTF-8 bytes otherwise,
   which over-counts symbols such as "▁" and "<0x41>" and so stays sound).
3. Normalization shrinks the text by at most a factor F: NFC/NFD 3 and
   Lowercase 3 (U+212A KELVIN SIGN, 3 bytes, becomes "K"/"k"; Hangul L+V+T
   jamo, 9 bytes, compose to one 3-byte syllable), NFKC/NFKD 4 (U+1D42A
   MATHEMATICAL BOLD SMALL Q, 4 bytes, becomes "q"), a literal Replace by
   len(pattern)/len(content);
   a sequence multiplies. Measured over every code point with Python's
   unicodedata; other normalizers (regex Replace, Precompiled, Strip, Nmt, Bert)
   give no bound.

Then B = F * L. Special tokens added around the text only make the count larger.
"""
from __future__ import annotations

import json
from typing import Optional

# Bytes the normalized text can shrink to, at worst, per byte of input (see 3. above).
_NORMALIZER_SHRINK = {"NFC": 3.0, "NFD": 3.0, "NFKC": 4.0, "NFKD": 4.0, "Lowercase": 3.0,
                      "Prepend": 1.0, "ByteLevel": 1.0}
# Pre-tokenizers that keep every character of their input (a Split/Punctuation that removes is refused below).
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "UnicodeScripts"}
_MAX_CHAR_BYTES = 4  # UTF-8


class NoBound(Exception):
    """The tokenizer may drop or absorb text without limit: no byte bound on the tokens."""


def _normalizer_shrink(spec: Optional[dict]) -> float:
    if spec is None:
        return 1.0
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1.0
        for sub in spec.get("normalizers", []):
            factor *= _normalizer_shrink(sub)
        return factor
    if kind == "Replace":
        pattern, content = spec.get("pattern", {}), spec.get("content", "")
        if "String" not in pattern or not content:
            raise NoBound(f"normalizer Replace({pattern}, {content!r}) may remove text")
        return max(1.0, len(pattern["String"].encode()) / len(content.encode()))
    if kind in _NORMALIZER_SHRINK:
        return _NORMALIZER_SHRINK[kind]
    raise NoBound(f"normalizer {kind} may remove text")


def _pre_tokenizers(spec: Optional[dict]) -> list[dict]:
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        return [p for sub in spec.get("pretokenizers", []) for p in _pre_tokenizers(sub)]
    return [spec]


def bytes_per_token(tokenizer_json: str | dict) -> float:
    """B: at most how many bytes of input text one token stands for (module docstring); raises NoBound."""
    tj = json.loads(tokenizer_json) if isinstance(tokenizer_json, str) else tokenizer_json
    if tj.get("truncation"):
        raise NoBound("the tokenizer truncates")
    shrink = _normalizer_shrink(tj.get("normalizer"))
    pres = _pre_tokenizers(tj.get("pre_tokenizer"))
    for p in pres:
        if p.get("type") not in _KEEPING_PRE_TOKENIZERS or p.get("behavior") == "Removed":
            raise NoBound(f"pre-tokenizer {p.get('type')} ({p.get('behavior', '')}) may drop text")
    byte_level = any(p.get("type") == "ByteLevel" for p in pres)
    model = tj.get("model") or {}
    kind = model.get("type")
    if kind == "BPE":
        vocab = model.get("vocab") or {}
        tokens = list(vocab)
    elif kind == "Unigram":
        tokens = [piece for piece, _ in model.get("vocab") or []]
    else:
        raise NoBound(f"model {kind}: an unknown token may stand for a whole word")
    covers_all = byte_level and kind == "BPE" and all(chr(c) in vocab for c in _byte_level_alphabet())
    longest = 0
    # Byte fallback turns an unknown character into its bytes, one <0xNN> token each, but a byte whose token is
    # missing falls back to the unknown token (which fuse_unk would merge with its neighbours): all 256 needed.
    token_set = set(tokens)
    byte_fallback = model.get("byte_fallback") and all(f"<0x{b:02X}>" in token_set for b in range(256))
    if not covers_all:
        if byte_fallback:
            pass  # an unknown character becomes its bytes, one token each
        elif model.get("unk_token") is not None and kind == "BPE" and not model.get("fuse_unk"):
            longest = _MAX_CHAR_BYTES  # one unknown token per unknown character
        else:
            raise NoBound("unknown characters are dropped or fused into one token")
    unit = len if byte_level else (lambda t: len(t.encode()))
    longest = max([longest] + [unit(t) for t in tokens])
    for added in tj.get("added_tokens") or []:
        if added.get("lstrip") or added.get("rstrip"):
            raise NoBound(f"added token {added.get('content')!r} absorbs the whitespace around it")
        longest = max(longest, len(added.get("content", "").encode()))
    if longest == 0:
        raise NoBound("the vocabulary is empty")
    return shrink * longest


def _byte_level_alphabet() -> list[int]:
    """The 256 code points GPT-2's ByteLevel maps bytes to (printable bytes stand for themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [256 + i for i in range(256 - len(keep))]
    return keep + extra


def max_prompt_bytes(tokenizer_json: str | dict, max_model_len: int) -> Optional[int]:
    """Longest text (UTF-8 bytes) that can encode to at most max_model_len - 1 tokens; None if unknowable."""
    try:
        return int((max_model_len - 1) * bytes_per_token(tokenizer_json))
    except NoBound:
        return None
