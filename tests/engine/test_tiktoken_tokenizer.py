"""Kimi K2 / K2.5's tokenizer as shipped (tiktoken.model + tokenizer_config.json, no tokenizer.json; issue 44), read by
engine/core/tiktoken_files.py without running tokenization_kimi.py.

Oracles: tiktoken's algorithm in plain Python (tests/helpers/tiktoken_tokenizer.py: the `regex` module's split, the
lowest-rank pair merged first) on a byte-level vocabulary trained here; transformers' own TikTokenConverter (its
byte-level merges from the ranks, given the ranks directly: it needs the `tiktoken` package only to read the file);
the `tiktoken` package itself where installed (not in the lock). The engine serves a tiny Kimi-K2.5-shaped INT4
checkpoint shipped that way: a text prompt gives the ids the oracle encodes and the tokens of the same ids given
as a token-id prompt (tests/engine/test_int4_checkpoint.py holds those equal to transformers)."""
from __future__ import annotations

import importlib.util

import pytest

from moelink.engine.core.tiktoken_files import KIMI, byte_level_bpe, read_ranks
from moelink.engine.core.tokenizer import Tokenizer

from tests.helpers.tiktoken_tokenizer import (KIMI_TEMPLATE, kimi_specials, rank_file_text, tiktoken_decode,
                                              tiktoken_encode, train_ranks, write_kimi_tokenizer)

TEXTS = [
    "the cat reads a long letter in the morning.",
    "Hello WORLD, it's 12345 o'clock; THE Engine's   spaces\n\n\nand\ttabs  ",
    "你好世界 mixed 日本語 text, Ünïcode façade naïve — “quotes” 🙂👍🏽",
    "<|im_user|>user<|im_middle|>hi there<|im_end|>[EOS] trailing [BOS]x",
    "  leading spaces and 0123456789 digits99 and a\r\nwindows line",
    "",
]


@pytest.fixture(scope="module")
def kimi_dir(tmp_path_factory):
    ranks = train_ranks(KIMI.pattern, 160)
    out = tmp_path_factory.mktemp("kimi_tok")
    write_kimi_tokenizer(out, ranks)
    return out, ranks


def test_encode_decode_equal_tiktoken(kimi_dir):
    out, ranks = kimi_dir
    tok = Tokenizer.from_dir(out)
    specials = kimi_specials(len(ranks))
    assert tok.vocab_size == len(ranks) + 258
    assert tok.bos_token_id == len(ranks) and tok.eos_token_id == len(ranks) + 1
    assert tok.convert_tokens_to_ids("<|reserved_token_%d|>" % (len(ranks) + 5)) == len(ranks) + 5
    merged = 0
    for text in TEXTS:
        want = tiktoken_encode(text, ranks, specials, KIMI.pattern)
        got = tok.encode(text)
        assert got == want, text
        assert tok.decode(got, skip_special_tokens=False) == text == tiktoken_decode(want, ranks, specials)
        merged += sum(256 <= i < len(ranks) for i in got)
    assert merged > 10, "the trained merges are never used: the test would not see a wrong merge order"
    # special tokens are skipped when asked, as tokenization_kimi's all_special_ids
    ids = tok.encode("<|im_user|>hi<|im_end|>")
    assert tok.decode(ids) == "hi" and {ids[0], ids[-1]} <= set(tok.all_special_ids)


def test_equal_to_transformers_converter(kimi_dir):
    """transformers' TikTokenConverter (its reading of the file is tiktoken's: handed the ranks here) builds the same
    tokenizer: equal encodings of every text, equal merges."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    out, ranks = kimi_dir

    class Given(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(_url):
            return dict(ranks)

    ref = Given(vocab_file="unused", pattern=KIMI.pattern, extra_special_tokens=list(kimi_specials(len(ranks)))).converted()
    tok = Tokenizer.from_dir(out)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text).ids, text
    assert byte_level_bpe(ranks)[1] == Given(vocab_file="unused").extract_vocab_merges_from_model("unused")[1]


@pytest.mark.skipif(importlib.util.find_spec("tiktoken") is None, reason="the tiktoken package is not installed")
def test_equal_to_tiktoken_package(kimi_dir):
    import tiktoken

    out, ranks = kimi_dir
    enc = tiktoken.Encoding("kimi-test", pat_str=KIMI.pattern, mergeable_ranks=ranks,
                            special_tokens=kimi_specials(len(ranks)))
    tok = Tokenizer.from_dir(out)
    for text in TEXTS:
        assert tok.encode(text) == enc.encode(text, allowed_special="all"), text


def test_chat_template_as_shipped(kimi_dir):
    out, ranks = kimi_dir
    tok = Tokenizer.from_dir(out)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat's 3 apples?"}]
    ids = tok.apply_chat_template(msgs, tokenize=True)
    text = ("<|im_system|>system<|im_middle|>be brief<|im_end|><|im_user|>user<|im_middle|>the cat's 3 apples?"
            "<|im_end|><|im_assistant|>assistant<|im_middle|>")
    assert tok.chat_template == KIMI_TEMPLATE
    assert ids == tiktoken_encode(text, ranks, kimi_specials(len(ranks)), KIMI.pattern)


def test_tools_reach_the_template_with_sorted_keys(tmp_path, kimi_dir):
    """Kimi's tokenizer code sorts the tools' keys at every depth before rendering: the same JSON here."""
    out, ranks = kimi_dir
    (tmp_path / "tiktoken.model").write_text(rank_file_text(ranks))
    import json

    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ tools | tojson }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"z": 1, "a": {"y": 2, "b": 3}}}}]
    text = Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}], tools=tools)
    assert text == ('[{"function": {"name": "f", "parameters": {"a": {"b": 3, "y": 2}, "z": 1}}, "type": "function"}]')
    assert tools[0]["function"]["parameters"] == {"z": 1, "a": {"y": 2, "b": 3}}  # the caller's dict is not changed


@pytest.mark.parametrize("body,match", [
    ("YWJj 0\nnot-base64!! 1\n", r"line 2 is invalid: a tiktoken rank file"),
    ("YWJj 0 7\n", r"line 1 is invalid"),
    ("YWJj x\n", r"line 1 is invalid"),
    ("YWJj 0\nYWJj 1\n", r"line 2 is invalid: token b'abc' rank 1: each token"),
    ("YWJj 0\nYWI= 0\n", r"line 2 is invalid"),
    ("YWJj 0\nYWI= 5\n", r"ranks must be 0..1 \(dense\), found up to 5"),
    ("", r"ranks must be 0..-1 \(dense\), found none"),
    ("YWJj 0\nYWI= 1\n", r"256 single bytes are no token \(first: 0x00\)"),
])
def test_bad_rank_files(tmp_path, body, match):
    (tmp_path / "tiktoken.model").write_text(body)
    with pytest.raises(ValueError, match=match):
        read_ranks(tmp_path / "tiktoken.model")


def test_named_ids_keep_their_ids(tmp_path, kimi_dir):
    """A name past the 258-id block extends it (reserved names between); a name on a rank's id is refused."""
    import json

    out, ranks = kimi_dir
    n = len(ranks)
    (tmp_path / "tiktoken.model").write_text(rank_file_text(ranks))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"][str(n + 300)] = {"content": "<|media_pad|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.vocab_size == n + 301 and tok.convert_tokens_to_ids("<|media_pad|>") == n + 300
    assert tok.convert_tokens_to_ids(f"<|reserved_token_{n + 299}|>") == n + 299
    cfg["added_tokens_decoder"]["97"] = {"content": "<|bad|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"added_tokens_decoder names id 97 \('<\|bad\|>'\), a rank of tiktoken.model"):
        Tokenizer.from_dir(tmp_path)


def test_unknown_tiktoken_class_and_missing_files(tmp_path, kimi_dir):
    out, ranks = kimi_dir
    (tmp_path / "tiktoken.model").write_text(rank_file_text(ranks))
    (tmp_path / "tokenizer_config.json").write_text('{"auto_map": {"AutoTokenizer": ["tokenization_x.XTok", null]}}')
    with pytest.raises(ValueError, match=r"tokenizer class 'tokenization_x.XTok' .*tokenization_kimi.TikTokenTokenizer"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tiktoken.model").unlink()
    with pytest.raises(ValueError, match=r"No tokenizer.json \(or tiktoken.model\)"):
        Tokenizer.from_dir(tmp_path)


def test_engine_serves_kimi_k25_shipped_with_tiktoken(tmp_path_factory):
    """A tiny Kimi K2.5 (INT4 experts, text model under language_model.) whose tokenizer is tiktoken.model: a text
    prompt and a chat are encoded as tiktoken would, and generate the tokens of the same ids given directly."""
    from moelink.engine import LLM, SamplingParams
    from tests.helpers.int4_checkpoints import int4_checkpoint, kimi_k25_checkpoint, save_tiny

    root = tmp_path_factory.mktemp("k25_tiktoken")
    dsv3 = int4_checkpoint(save_tiny(root / "float", "dsv3"), root / "int4", True, 32, "experts")
    k25 = kimi_k25_checkpoint(dsv3, root / "k25")
    ranks = train_ranks(KIMI.pattern, 100)  # 356 ranks: the named specials (356..373) inside the tiny 400-row vocab
    write_kimi_tokenizer(k25, ranks)
    specials = kimi_specials(len(ranks))
    llm = LLM(k25, dtype="float64", max_num_seqs=4, max_num_batched_tokens=64, num_kv_blocks=64, block_size=8)
    text = "the robot paints three apples near the station"
    want_ids = tiktoken_encode(text, ranks, specials, KIMI.pattern)
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    a, b = llm.generate([text, {"prompt_token_ids": want_ids}], sp, use_tqdm=False)
    assert a.prompt_token_ids == want_ids
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    out_ids = list(a.outputs[0].token_ids)
    keep = [i for i in out_ids if i < len(ranks)]  # special ids (reserved rows of the tiny vocab) decode to nothing
    assert a.outputs[0].text == tiktoken_decode(keep, ranks, specials)
    chat = llm.chat([{"role": "user", "content": "hi"}], sp, use_tqdm=False)[0]
    assert chat.prompt_token_ids == tiktoken_encode("<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant"
                                                    "<|im_middle|>", ranks, specials, KIMI.pattern)
