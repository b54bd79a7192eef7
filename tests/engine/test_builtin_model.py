"""The built-in model (builtin-model/, made by `moelink train-builtin-model`): it writes words, it matches
transformers token for token, structured output works with its tokenizer, and its training script runs.

The word test is the issue's acceptance check: greedy continuations of five fixed prompts decode to valid
UTF-8 in which most alphabetic words are words of the training corpus (builtin-model/words.txt, written by
the training run). A random-weight model fails it (its greedy output is stray byte pieces); a trained one
passes with room to spare.
"""
from __future__ import annotations

import json
import re

import pytest

from moelink.engine import LLM
from moelink.engine.tools.builtin_model import BUILTIN_MODEL_DIR, MARKER_FILE, describe, read_record
from moelink.engine.contract.sampling_params import SamplingParams

from tests.helpers.parity import hf_greedy

PROMPTS = [
    "Return the number of",
    "This module provides",
    "The default value is",
    "Raise an exception if the file",
    "Create a new thread that",
]
MAX_NEW = 24
MIN_WORD_RATIO = 0.7
MODEL = str(BUILTIN_MODEL_DIR)


def _words(text: str) -> list[str]:
    """Whitespace-separated tokens that are letters only once surrounding punctuation is stripped."""
    tokens = (t.strip(".,;:!?()[]{}'\"`") for t in text.split())
    return [t.lower() for t in tokens if t.isalpha() and t.isascii()]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(BUILTIN_MODEL_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def greedy(tokenizer):
    """moelink's greedy continuations (float64, as transformers runs below) of the five prompts."""
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    with LLM(MODEL, dtype="float64", max_model_len=256, num_kv_blocks=64) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    return prompts, [o.outputs[0] for o in outs]


def test_the_committed_files_are_small_and_transformers_format():
    files = {p.name: p.stat().st_size for p in BUILTIN_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md", "words.txt", MARKER_FILE} <= set(files)
    assert sum(files.values()) <= 10_000_000, files
    cfg = json.loads((BUILTIN_MODEL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["dtype"] == "float32"


def test_greedy_output_is_utf8_words(greedy, tokenizer):
    """What a client sees: the greedy text up to the model's first stop token (<|endoftext|> or <|im_end|>;
    the fixture ran on past them, for the parity test)."""
    words = set((BUILTIN_MODEL_DIR / "words.txt").read_text().split())
    stops = {tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>")}
    found_all = []
    for prompt, out in zip(PROMPTS, greedy[1]):
        # Valid UTF-8: the detokenizer writes U+FFFD for bytes that do not decode, and a round trip holds.
        assert "\ufffd" not in out.text and out.text.encode("utf-8").decode("utf-8") == out.text, (prompt, out.text)
        assert out.text == tokenizer.decode(out.token_ids)  # the streamed text is the whole decode
        ids = list(out.token_ids)
        cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        text = tokenizer.decode(ids[:cut])
        found = _words(text)
        assert len(found) >= 2, (prompt, text)  # words, not punctuation or code
        ratio = sum(w in words for w in found) / len(found)
        assert ratio >= MIN_WORD_RATIO, f"{prompt!r} -> {text!r}: {ratio:.0%} dictionary words"
        found_all += found
    assert len(found_all) >= 12 and sum(w in words for w in found_all) / len(found_all) >= MIN_WORD_RATIO


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_greedy_tokens_equal_transformers(greedy):
    prompts, outs = greedy
    want = hf_greedy(MODEL, prompts, max_new=MAX_NEW)
    for prompt, out, w in zip(PROMPTS, outs, want):
        assert list(out.token_ids) == w, f"{prompt!r}: moelink {out.token_ids} != transformers {w}"


def test_served_dtype_float32_gives_the_same_greedy_tokens(greedy):
    """`make serve` runs the model as config.json says (float32): same tokens as the float64 oracle run."""
    prompts, outs = greedy
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    with LLM(MODEL, max_model_len=256, num_kv_blocks=64) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == [o.token_ids for o in outs]


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_json_schema_request_returns_valid_json():
    pytest.importorskip("xgrammar")
    jsonschema = pytest.importorskip("jsonschema")
    from moelink.engine.contract.structured_output_params import StructuredOutputParams

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "size": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "size"], "additionalProperties": False}
    params = SamplingParams(temperature=0.0, max_tokens=48, structured_outputs=StructuredOutputParams(json=schema))
    with LLM(MODEL, max_model_len=256, num_kv_blocks=64) as llm:
        out = llm.generate(["Return a JSON object describing the file:"], params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), schema)


def test_banner_names_the_builtin_model_only():
    note = describe(BUILTIN_MODEL_DIR)
    assert note and "tiny MoE" in note and "docstrings" in note and "not a useful assistant" in note, note
    assert "moelink train-builtin-model builtin-model" in note
    record = read_record(BUILTIN_MODEL_DIR)
    assert record["final_held_out_loss"] < record["history"][0]["held_out_loss"]
    assert describe(None) is None and describe(BUILTIN_MODEL_DIR.parent / "engine") is None


def test_model_card_names_the_command_seed_and_run():
    card = (BUILTIN_MODEL_DIR / "README.md").read_text()
    record = read_record(BUILTIN_MODEL_DIR)
    assert "moelink train-builtin-model builtin-model" in card
    for value in (record["python"], str(record["config"]["seed"]), str(record["config"]["steps"]),
                  f"{record['final_held_out_loss']:.2f}"):
        assert value in card, value


# --- the training script (a few steps on a slice of the corpus, so it cannot rot) ---

_SMOKE = ["--max-files", "12", "--steps", "4", "--warmup-steps", "1", "--eval-every", "2", "--vocab-size", "400",
          "--seq-len", "32", "--batch-size", "2", "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2",
          "--num-kv-heads", "1", "--num-experts", "4", "--moe-intermediate-size", "16"]


def test_training_script_smoke(tmp_path, capsys):
    from moelink.engine.api.cli import main

    out = tmp_path / "m"
    assert main(["train-builtin-model", str(out), *_SMOKE]) == 0
    record = read_record(out)
    assert record["config"]["steps"] == 4 and [h["step"] for h in record["history"]] == [2, 4]
    assert describe(out).startswith("built-in model: a tiny MoE")
    # What it wrote is a checkpoint moelink serves and transformers loads.
    with LLM(str(out), dtype="float64", max_model_len=64, num_kv_blocks=16) as llm:
        got = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0].token_ids
    assert list(got) == hf_greedy(str(out), [[5, 6, 7]], max_new=3)[0]


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_training_is_deterministic_given_the_seed(tmp_path):
    from moelink.engine.api.cli import main

    for name in ("a", "b"):
        assert main(["train-builtin-model", str(tmp_path / name), *_SMOKE, "--steps", "2", "--eval-every", "2"]) == 0
    a, b = ((tmp_path / n / "model.safetensors").read_bytes() for n in "ab")
    assert a == b


@pytest.mark.parametrize("flag,value,field", [("--top-k", "9", "top_k"), ("--seq-len", "2048", "seq_len"),
                                              ("--warmup-steps", "4", "warmup_steps")])
def test_bad_training_flags_name_the_field(tmp_path, capsys, flag, value, field):
    from moelink.engine.api.cli import main

    assert main(["train-builtin-model", str(tmp_path), *_SMOKE, flag, value]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"{field}=\S+ is invalid", err), err


def test_docstring_cleaning_keeps_prose_and_drops_code():
    from moelink.engine.tools.builtin_corpus import chat_text, clean_docstring, Doc

    doc = '''Return the :func:`len` of ``x``, counted
    the usual way.

    >>> size([1, 2])
    2

        indented = code(example)

    Raises ValueError if x is not a sequence.
    '''
    assert clean_docstring(doc) == ("Return the len of x, counted the usual way.",
                                    "Raises ValueError if x is not a sequence.")
    assert "What does json.dumps do?" in chat_text(Doc("json", "dumps", ("Serialize obj to a JSON string.",)))
    assert chat_text(Doc("json", "_private", ("Serialize obj to a JSON string.",))) is None


def test_make_serve_serves_the_committed_model_without_a_generation_step():
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", "-s", "serve"], cwd=BUILTIN_MODEL_DIR.parent, capture_output=True, text=True,
                         timeout=30).stdout
    assert "moelink serve builtin-model --host 127.0.0.1" in out, out
    assert "make-tiny-model" not in out and "train-builtin-model" not in out, out
