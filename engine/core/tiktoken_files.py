"""Tokenizers shipped as a tiktoken rank file (`tiktoken.model`) with no tokenizer.json: Kimi K2 / K2 Thinking /
K2.5, read without running the checkpoint's Python tokenizer (`tokenization_kimi.py`, remote code).

What the checkpoint ships and what is read of it:
- `tiktoken.model`: tiktoken's BPE rank file, one `<base64 token bytes> <rank>` a line, ranks 0..N-1 (`read_ranks`);
- `tokenizer_config.json`: `auto_map.AutoTokenizer` names the remote class, which picks the layout below (the split
  regex and the special-token block are constants of that class, not data of the files), `added_tokens_decoder`
  names the special tokens; the chat template and named tokens are read by engine/core/tokenizer.py as for any model.

tiktoken's encoding of a text: special tokens matched first (Kimi encodes with allowed_special="all"), the text
between them split by the regex, each piece returned whole when it is a token, else its bytes merged pairwise, the
adjacent pair whose concatenation has the lowest rank first. A `tokenizers` BPE does the same with (`byte_level_bpe`):
the vocabulary = the ranks (bytes spelled in GPT-2's byte-to-unicode alphabet, as the ByteLevel pre-tokenizer and
decoder expect), one merge (left, right) per split of a token into two tokens, ordered by the merged token's rank
(ties: by the parts' ranks), and `ignore_merges` (a piece that is a token is not merged). transformers'
`convert_slow_tokenizer.TikTokenConverter` derives the same (it needs the `tiktoken` package only to read the file);
tests/engine/test_tiktoken_tokenizer.py holds the result equal to a plain tiktoken-algorithm encoder and to that
converter.

Kimi's special-token block (`tokenization_kimi.py`): ids N .. N + 257 right after the N ranks (256 reserved + 2),
named by `added_tokens_decoder` where it names them ([BOS], [EOS], <|im_end|>, <|im_user|>, ...), else
`<|reserved_token_{id}|>`; all are special (matched in text, skipped by decode(skip_special_tokens=True)). A name
past the block extends it, so every id tokenizer_config.json names keeps its id; a name on a rank's id is refused.
Its chat rendering sorts the keys of `tools` recursively (`sort_tools`; engine/core/tokenizer.py applies it). Not
copied: its encode's cut of runs over 25,000 whitespace or non-whitespace characters (a guard against a tiktoken
panic), which changes only such runs' tokens.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

TIKTOKEN_FILE = "tiktoken.model"


@dataclass(frozen=True)
class TiktokenLayout:
    """What a tiktoken tokenizer class fixes in its code: the pre-tokenizer regex and the special-token block."""

    name: str
    pattern: str
    num_special: int  # ids N .. N + num_special - 1 follow the N ranks
    sort_tools: bool = False  # its apply_chat_template sorts the keys of `tools` (recursively) before rendering

    def __post_init__(self) -> None:
        if self.num_special < 0:
            raise ValueError(f"TiktokenLayout.num_special={self.num_special} is invalid: must be >= 0.")


# Kimi's split: Han runs alone, cased words with English contractions, numbers of up to 3 digits, punctuation runs,
# newlines, spaces (the alternatives of its `pat_str`, in order; `&&` is a class intersection, which both tiktoken's
# fancy-regex and tokenizers' Oniguruma read).
_KIMI_LETTERS_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_KIMI_LETTERS_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
KIMI = TiktokenLayout("kimi", "|".join([
    r"[\p{Han}]+",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_KIMI_LETTERS_UPPER}*{_KIMI_LETTERS_LOWER}+{_CONTRACTIONS}",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_KIMI_LETTERS_UPPER}+{_KIMI_LETTERS_LOWER}*{_CONTRACTIONS}",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
]), 256 + 2, sort_tools=True)

# tokenizer_config.json's auto_map.AutoTokenizer[0] (the remote class) -> its layout: Kimi K2, K2 Thinking, K2.5 and
# Kimi-Linear ship the same class.
LAYOUTS: dict[str, TiktokenLayout] = {"tokenization_kimi.TikTokenTokenizer": KIMI}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what tokenizers' ByteLevel pre-tokenizer and decoder use): printable
    Latin-1 bytes map to themselves, the other 68 to U+0100 onwards in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """tiktoken's rank file -> {token bytes: rank}; ranks must be 0..N-1, each once, and every single byte a token
    (a byte-level BPE spells any text with them). One ValueError naming the file, the line and what is allowed."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    seen: set[int] = set()
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("need two fields")
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error):
                raise ValueError(f"{path} line {n} is invalid: a tiktoken rank file holds '<base64 token> <rank>' "
                                 f"per line, found {line[:80]!r}.") from None
            if not token or rank < 0 or token in ranks or rank in seen:
                raise ValueError(f"{path} line {n} is invalid: token {token!r} rank {rank}: each token must be "
                                 "non-empty and appear once, each rank >= 0 once.")
            ranks[token] = rank
            seen.add(rank)
    if not ranks or max(seen) != len(ranks) - 1:
        raise ValueError(f"{path} is invalid: its {len(ranks)} ranks must be 0..{len(ranks) - 1} (dense), found "
                         f"{'none' if not ranks else f'up to {max(seen)}'}.")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path} is invalid: {len(missing)} single bytes are no token (first: {missing[0]:#04x}); a "
                         "byte-level BPE needs all 256.")
    return ranks


def byte_level_bpe(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the tokenizers BPE that encodes as tiktoken does with `ranks` (module docstring)."""
    table = bytes_to_unicode()
    spell = lambda b: "".join(table[x] for x in b)  # noqa: E731
    vocab = {spell(t): r for t, r in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return vocab, [(spell(a), spell(b)) for *_, a, b in merges]


def layout_of(tok_config: dict, model_dir: Path) -> TiktokenLayout:
    """The layout tokenizer_config.json's remote class stands for; a ValueError naming it when unknown."""
    auto = (tok_config.get("auto_map") or {}).get("AutoTokenizer")
    cls = auto[0] if isinstance(auto, (list, tuple)) and auto else auto
    if cls not in LAYOUTS:
        raise ValueError(f"{str(model_dir)!r} ships {TIKTOKEN_FILE} with tokenizer class {cls!r} "
                         f"(tokenizer_config.json auto_map.AutoTokenizer): moelink reads the tiktoken layouts of "
                         f"{', '.join(sorted(LAYOUTS))} (it runs no checkpoint code); for another, add a tokenizer.json.")
    return LAYOUTS[cls]


def special_tokens(layout: TiktokenLayout, num_ranks: int, tok_config: dict) -> list[AddedToken]:
    """The special-token block in id order (ids num_ranks ..), named by added_tokens_decoder where it names them;
    a name past the layout's block extends it (the ids between are reserved tokens), so every named id keeps its id."""
    named = {}
    for key, spec in (tok_config.get("added_tokens_decoder") or {}).items():
        content = spec.get("content") if isinstance(spec, dict) else spec
        if str(key).isdigit() and isinstance(content, str):
            named[int(key)] = content
    below = sorted(i for i in named if i < num_ranks)
    if below:
        raise ValueError(f"tokenizer_config.json added_tokens_decoder names id {below[0]} ({named[below[0]]!r}), a rank "
                         f"of {TIKTOKEN_FILE}: its special tokens must take ids from {num_ranks} on.")
    end = max([num_ranks + layout.num_special] + [i + 1 for i in named])
    return [AddedToken(named.get(i, f"<|reserved_token_{i}|>"), special=True, normalized=False)
            for i in range(num_ranks, end)]


def tiktoken_backend(model_dir: str | Path, tok_config: dict, layout: TiktokenLayout) -> _HFTokenizer:
    """The `tokenizers.Tokenizer` of a checkpoint shipping tiktoken.model in `layout` (module docstring)."""
    model_dir = Path(model_dir)
    ranks = read_ranks(model_dir / TIKTOKEN_FILE)
    vocab, merges = byte_level_bpe(ranks)
    tok = _HFTokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(layout.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = special_tokens(layout, len(ranks), tok_config)
    tok.add_special_tokens(specials)
    for i, t in enumerate(specials):  # tokenizers numbers added tokens after the vocabulary, in order: check it
        if tok.token_to_id(t.content) != len(ranks) + i:
            raise ValueError(f"{model_dir / 'tokenizer_config.json'}: special token {t.content!r} of id "
                             f"{len(ranks) + i} is also an earlier token; each id of the block needs its own text.")
    return tok


__all__ = ["KIMI", "LAYOUTS", "TIKTOKEN_FILE", "TiktokenLayout", "byte_level_bpe", "bytes_to_unicode", "layout_of",
           "read_ranks", "tiktoken_backend"]
