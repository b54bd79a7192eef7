"""Tokenizer and IncrementalDetokenizer, checked against transformers' AutoTokenizer."""
from __future__ import annotations

import json
import random
import shutil

import pytest

from moelink.engine.core.output_processor import IncrementalDetokenizer
from moelink.engine.tools.tiny_model import make_tiny_model
from moelink.engine.core.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "The quick brown fox jumps over the lazy dog.\n\nNew paragraph\twith tab.",
    "def f(x):\n    return x * 2  # comment",
    "Café, naïve, Zürich, São Paulo — “quotes” …",
    "中文文本：今天天气很好。日本語 こんにちは 한국어",
    "Emoji: 😀🎉🚀 👍🏽 👨‍👩‍👧 ❤️ 🇫🇷",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> inside",
    "numbers 3.14159 -17 1e-6 $12.99 2024-06-01",
    "\x00\x01 control \u200b zero-width \ufffd replacement",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3_moe")


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def hf_tok(model_dir):
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


# ---- Tokenizer -----------------------------------------------------------

def test_encode_matches_transformers(tok, hf_tok):
    for text in TEXTS:
        assert tok.encode(text) == hf_tok.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False), text


def test_decode_matches_transformers(tok, hf_tok):
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
    for text in TEXTS:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_special_tokens_and_vocab(tok, hf_tok):
    assert tok.vocab_size == len(hf_tok) == 512
    assert tok.bos_token_id == hf_tok.bos_token_id == 0
    # config.json says eos 0; generation_config.json adds <|im_end|> (2).
    assert tok.eos_token_ids == {0, 2}
    assert tok.eos_token_id == 0
    assert tok.all_special_ids == [0, 1, 2]
    assert tok.model_max_length == 1024
    ids = tok.encode("Hello <|im_end|>")
    assert tok.convert_ids_to_tokens(ids) == hf_tok.convert_ids_to_tokens(ids)
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>"
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert tok.decode([5, 99999]) == tok.decode([5]), "ids past the tokenizer (embedding padding) decode to nothing"


def test_chat_template_matches_transformers(tok, hf_tok):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Bonjour 😀"},
        {"role": "assistant", "content": "Salut."},
        {"role": "user", "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}]},
    ]
    for gen_prompt in (True, False):
        text = tok.apply_chat_template(messages, add_generation_prompt=gen_prompt)
        assert text == hf_tok.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False)
    text = tok.apply_chat_template(messages[:2])
    assert text == "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nBonjour 😀<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages[:2], tokenize=True)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids.count(1) == 3 and ids.count(2) == 2  # specials are single tokens


@pytest.mark.parametrize("final", ["The number of", "The number of ", [{"type": "text", "text": "The number of"}]])
def test_continue_final_message_matches_transformers(tok, hf_tok, final):
    """continue_final_message renders the last message without its closing end-of-turn (transformers' cut, which
    vLLM's LLM.chat passes on), in both ways of encoding the contents' special tokens."""
    messages = [{"role": "user", "content": "Count <|im_end|> them."}, {"role": "assistant", "content": final}]
    text = tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert text == hf_tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True,
                                              tokenize=False)
    assert text.endswith("assistant\n" + (final if isinstance(final, str) else "The number of"))
    ids = tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True, tokenize=True)
    assert ids == tok.encode(text, add_special_tokens=False)
    as_text = tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True,
                                      tokenize=True, special_tokens_in_content="text")
    assert tok.decode(as_text, skip_special_tokens=False) == text and as_text.count(2) == 1  # the content's is text
    with pytest.raises(ValueError, match="continue_final_message and add_generation_prompt cannot both be true"):
        tok.apply_chat_template(messages, continue_final_message=True)


def test_chat_template_sandboxed_and_errors(model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Chat template"):
        Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}])
    cfg["chat_template"] = "{{ raise_exception('no system role') }}"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no system role"):
        Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}])
    del cfg["chat_template"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}])
    # A template saved as chat_template.jinja (newer transformers) is found too.
    (d / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] | tojson }}]{% endfor %}")
    assert Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "é"}]) == '["é"]'


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json") as e:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_eos_ids_from_int_or_list(model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    (d / "config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert Tokenizer.from_dir(d).eos_token_ids == {0, 7, 8, 9}


def test_bos_from_post_processor_matches_transformers(model_dir, tmp_path):
    # Llama/Mistral-style files: tokenizer.json's TemplateProcessing adds BOS.
    # transformers v5 follows that post-processor (and ignores add_bos_token
    # when tokenizer.json exists); we must give the same ids.
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    (d / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(add_bos_token=True, bos_token="<|im_start|>")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, ref = Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(str(d))
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
    assert ours.bos_token_id == 1
    assert ours.encode("hi")[0] == 1
    assert ours.encode("hi", add_special_tokens=False)[0] != 1


# ---- IncrementalDetokenizer ----------------------------------------------

def _stream(detok, ids, rng=None):
    """Feed ids in random-size chunks; return the list of deltas (flush last)."""
    rng = rng or random.Random(0)
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 4)
        deltas.append(detok.update(ids[i:i + n]))
        i += n
    deltas.append(detok.flush())
    return deltas


def test_deltas_concatenate_to_full_decode_random_ids(tok):
    rng = random.Random(1)
    for trial in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        prompt = tok.encode("Some prompt: ") if trial % 2 else []
        skip = trial % 3 != 0
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip, stop=[], include_stop_str_in_output=False)
        deltas = _stream(detok, ids, rng)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        assert detok.output_text == "".join(deltas)
        assert detok.stop_reason is None


def test_multibyte_chars_split_across_tokens_are_never_emitted_partially(tok):
    text = "Emoji 😀🎉 and 中文 and 👨‍👩‍👧 end"
    ids = tok.encode(text)
    # The byte-level tokenizer does split these characters over several tokens.
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)
    detok = IncrementalDetokenizer(tok, [], True, [], False)
    out = []
    for i in ids:  # one token at a time: worst case for split characters
        delta = detok.update([i])
        assert "\ufffd" not in delta
        out.append(delta)
    out.append(detok.flush())
    assert "".join(out) == text


def test_decode_window_stays_small(tok):
    calls = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 40)
    detok = IncrementalDetokenizer(Counting(), tok.encode("prompt " * 50), True, [], False)
    text = "".join(detok.update([i]) for i in ids) + detok.flush()
    assert text == tok.decode(ids)
    assert max(calls) <= 8, "each step must decode a short trailing window, not the whole output"


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_at_various_positions(tok, include):
    text = "The quick brown fox jumps over the lazy dog. Then it sleeps."
    ids = tok.encode(text)
    rng = random.Random(2)
    cases = ["quick", "brown fox", "fox jumps over", "The", "sleeps.", ". Then", "o", "dog", "q"]
    # Stops that span token boundaries, chosen from random character spans.
    for _ in range(30):
        a = rng.randrange(len(text) - 1)
        cases.append(text[a:a + rng.randint(1, 8)])
    for stop in cases:
        detok = IncrementalDetokenizer(tok, [], True, [stop, "NEVER-MATCHES"], include)
        deltas = _stream(detok, ids, rng)
        pos = text.find(stop)
        expected = text[:pos + len(stop)] if include else text[:pos]
        assert detok.stop_reason == stop
        assert "".join(deltas) == expected == detok.output_text, stop
        assert detok.update(tok.encode(" more")) == "" and detok.flush() == ""


def test_earliest_stop_wins_and_prefixes_are_held_back(tok):
    text = "alpha beta gamma delta"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [], True, ["delta", "gamma", "beta gam"], False)
    assert "".join(_stream(detok, ids)) == "alpha "
    assert detok.stop_reason == "beta gam"

    # "bet" could still grow into "betamax": it is held back, then released by flush.
    detok = IncrementalDetokenizer(tok, [], True, ["betamax"], False)
    shown = "".join(detok.update([i]) for i in tok.encode("alpha bet"))
    assert shown == "alpha " and detok.output_text == "alpha bet"
    assert detok.flush() == "bet" and detok.stop_reason is None

    # Text that cannot start a stop string is not held back at all.
    detok = IncrementalDetokenizer(tok, [], True, ["xyz!"], False)
    assert "".join(detok.update([i]) for i in tok.encode("alpha beta")) == "alpha beta"


def test_stop_string_inside_multibyte_and_special_tokens(tok):
    text = "ok 😀 stop here 中文"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [], True, ["😀 st"], True)
    assert "".join(_stream(detok, ids)) == "ok 😀 st"
    # With skip_special_tokens=False a special token's text can be a stop string.
    ids = tok.encode("answer<|im_end|>trailing")
    detok = IncrementalDetokenizer(tok, [], False, ["<|im_end|>"], False)
    assert "".join(_stream(detok, ids)) == "answer"
    assert detok.stop_reason == "<|im_end|>"


def test_invalid_stop_rejected(tok):
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(tok, [], True, [""], False)


def _deltas_both_ways(tok, prompt, ids, skip, monkeypatch, rng_seed):
    """The deltas of the Rust window (DecodeStream) and of the Python one, fed the same random chunks."""
    from moelink.engine.core import output_processor

    rust = IncrementalDetokenizer(tok, prompt, skip, [], False)
    assert rust._stream is not None, "a tokenizers tokenizer decodes in Rust"
    got = _stream(rust, ids, random.Random(rng_seed))
    with monkeypatch.context() as m:
        m.setattr(output_processor, "stream_decoder", lambda *a: None)
        python = IncrementalDetokenizer(tok, prompt, skip, [], False)
        assert python._stream is None
        want = _stream(python, ids, random.Random(rng_seed))
    return got, want


def test_the_rust_window_gives_the_python_windows_text(tok, monkeypatch):
    """decode_stream.py: the same text as the Python window, never a partial character, for texts with multi-byte
    characters and special tokens, after a prompt context or none, and for random ids (which can make the stream
    refuse a window: the Python window then takes over mid-stream). The two may release a held-back piece a chunk
    apart (their windows start at different tokens after a release), never different text."""
    rng = random.Random(7)
    cases = [(tok.encode(t), skip) for t in TEXTS for skip in (True, False)]
    cases += [([rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))], rng.random() < 0.5)
              for _ in range(100)]
    for n, (ids, skip) in enumerate(cases):
        prompt = tok.encode("Some prompt: ") if n % 2 else []
        got, want = _deltas_both_ways(tok, prompt, ids, skip, monkeypatch, n)
        assert "".join(got) == "".join(want) == tok.decode(ids, skip_special_tokens=skip), (n, ids)
        if n < 2 * len(TEXTS):  # real text: no delta ends inside a character (random ids may hold lone bytes)
            assert not any(d.endswith("\ufffd") for d in got[:-1]), (n, got)


def test_a_stream_the_rust_window_refuses_continues_in_python(tok):
    """A refusal mid-stream (DecodeStream raises) hands over to the Python window, no text lost or doubled."""
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 3)
    detok = IncrementalDetokenizer(tok, [], True, [], False)
    out = [detok.update(ids[:7])]

    class Refusing:
        def step(self, ids):
            return None
    detok._stream = Refusing()  # type: ignore[assignment]
    out += [detok.update([i]) for i in ids[7:]] + [detok.flush()]
    assert "".join(out) == tok.decode(ids) and detok._stream is None
