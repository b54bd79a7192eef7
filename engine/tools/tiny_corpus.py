"""The tiny test tokenizer: a built-in text corpus and the byte-level BPE trained on it.

It lives in code (not a downloaded data set) so that `make_tiny_model` works
offline and gives byte-identical tokenizers everywhere. The text mixes prose,
dialogue, code, numbers and some non-ASCII (accents, CJK, emoji) so that the
learned merges cover common English pieces while multi-byte characters still
get split across tokens now and then, which is what the detokenizer tests need.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS_TOKEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)  # ids 0, 1, 2 (the BPE trainer puts them first)

# ChatML, as Qwen uses; content may be a string or a list of {"type": "text"} parts.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- elif message['content'] is none %}{%- set content = '' %}"
    "{%- else %}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_PARAGRAPHS = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles "
    "begins with a single step. The weather today is sunny with a light breeze "
    "from the west, and the temperature will reach twenty-four degrees.",

    "Once upon a time, in a small village by the sea, there lived an old "
    "fisherman and his daughter. Every morning they walked down to the harbour, "
    "mended their nets, and watched the boats come in. The daughter asked many "
    "questions: why is the sea salty, where do the birds go in winter, and how "
    "far away is the moon?",

    "Mixture-of-experts models route each token to a few experts out of many. "
    "A router computes a score for every expert, keeps the top k, and the token "
    "is processed only by those experts. This makes the model large but the "
    "computation per token small. Serving such models well means balancing the "
    "load across devices and moving tokens quickly between them.",

    "User: What is the capital of France?\n"
    "Assistant: The capital of France is Paris.\n"
    "User: And of Japan?\n"
    "Assistant: Tokyo is the capital of Japan.\n"
    "User: Thank you! Can you write a short poem about autumn?\n"
    "Assistant: Leaves of amber, red and gold, drift down softly, brave and bold.",

    "def fibonacci(n):\n"
    "    a, b = 0, 1\n"
    "    for _ in range(n):\n"
    "        a, b = b, a + b\n"
    "    return a\n\n"
    "print([fibonacci(i) for i in range(10)])  # [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]\n",

    "for (int i = 0; i < count; ++i) { total += values[i] * weights[i]; }\n"
    "if (total > threshold) { return ERROR_OVERFLOW; } else { return OK; }",

    "Numbers and dates: 1, 2, 3, 10, 42, 100, 256, 1024, 65536, 3.14159, 2.71828, "
    "-17, 0.5, 99%, $12.99, 2024-06-01, 12:30 PM, version 1.2.3, ID #4521.",

    "In the library there were books about history, science, art and music. "
    "Students came to read, to study for exams, and sometimes simply to sit "
    "in the quiet room and think. The librarian knew every shelf by heart.",

    "Cooking is both a science and an art. To bake bread, mix flour, water, "
    "salt and yeast; knead the dough for ten minutes; let it rise for an hour; "
    "shape it, let it rise again, and bake it in a hot oven until golden.",

    "Le café est très bon. Ça va? Où est la gare? Die Straße ist groß und schön. "
    "El niño comió una manzana. São Paulo, Zürich, Kraków, Ångström, naïve, "
    "façade, jalapeño, résumé, coöperate.",

    "中文文本：今天天气很好。我们去公园散步吧。日本語：こんにちは、世界。"
    "한국어: 안녕하세요. Русский: привет, мир. Ελληνικά: γειά σου κόσμε.",

    "Emoji are encoded with several bytes each: 😀 😂 🎉 🚀 ❤️ 👍 🌍 🐍 🤖 ✨. "
    "Symbols too: © ® ™ € £ ¥ → ← ≤ ≥ ≠ ∞ ∑ √ π ° ± × ÷ … “quotes” ‘single’ — dash.",

    "Scientists study the natural world through observation and experiment. "
    "They form hypotheses, design tests, collect data, and revise their ideas "
    "when the evidence disagrees. Good science is careful, open and humble.",

    "The train left the station at seven o'clock. Passengers read newspapers, "
    "looked out of the windows at the green fields, or talked quietly with "
    "their neighbours. By noon the train had crossed the mountains.",

    "HTTP/1.1 200 OK\nContent-Type: application/json\n\n"
    '{"id": 17, "name": "tiny", "tags": ["moe", "test"], "ok": true, "score": 0.75}',

    "She said, \"I'll be there at five.\" He replied, 'Don't be late!' They "
    "couldn't agree on anything; we've all seen that before, haven't we?",
)

# Deterministic filler: simple sentences from fixed word lists give the BPE
# trainer repeated words (so merges form) without any randomness.
_SUBJECTS = ("the cat", "a student", "my friend", "the engine", "our team", "the old man", "a small bird", "the robot")
_VERBS = ("reads", "builds", "finds", "watches", "carries", "paints", "writes", "visits")
_OBJECTS = ("a long letter", "the red door", "three apples", "a new model", "the quiet river", "many tokens", "the blue sky", "an open book")
_PLACES = ("in the morning", "at night", "near the station", "after lunch", "every day", "on the hill", "in the garden", "by the window")


def _filler_sentences() -> list[str]:
    out = []
    for i in range(64):
        s = _SUBJECTS[i % len(_SUBJECTS)]
        v = _VERBS[(i * 3 + 1) % len(_VERBS)]
        o = _OBJECTS[(i * 5 + 2) % len(_OBJECTS)]
        p = _PLACES[(i * 7 + 3) % len(_PLACES)]
        out.append(f"{s.capitalize()} {v} {o} {p}.")
    return out


def corpus_texts() -> list[str]:
    """The training texts, in a fixed order (same list on every call)."""
    filler = _filler_sentences()
    chunks = [" ".join(filler[i:i + 8]) for i in range(0, len(filler), 8)]
    return list(_PARAGRAPHS) + chunks


def train_tiny_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE on the built-in corpus: any text encodes, ids 0-2 are the specials.

    Returns a `tokenizers.Tokenizer` with at most `vocab_size` ids (fewer when
    the small corpus runs out of merges).
    """
    return train_bpe_tokenizer(corpus_texts(), vocab_size)


def train_bpe_tokenizer(texts, vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on `texts` (an iterable of str), ids 0-2 the specials; deterministic.

    The built-in model (train_builtin.py) trains the same kind of tokenizer on the stdlib's docstrings.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes, even those absent from the corpus, so nothing is unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_configs(out: Path, tokenizer, max_len: int) -> None:
    """tokenizer_config.json and special_tokens_map.json as transformers expects them beside tokenizer.json."""
    added = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": None,
        "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "model_max_length": max_len, "errors": "replace",
    })
    _write_json(out / "special_tokens_map.json", {
        "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
        "additional_special_tokens": [IM_START, IM_END],
    })
