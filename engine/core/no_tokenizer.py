"""An engine without a tokenizer (vLLM's skip_tokenizer_init): a model directory with no tokenizer.json under
`--load-format dummy`, where config.json alone is enough to build the model and benchmark it on token ids.

`load_tokenizer` is the one place the engine gets its tokenizer: the model's own (engine/core/tokenizer.py, as
always), or, for a dummy model whose directory has none, a `NoTokenizer`. That stand-in has the attributes
front ends read (no bos, no chat template, the eos ids of config.json / generation_config.json) and refuses
everything that needs the vocabulary with one sentence; `check_request` refuses such a request up front
(text prompt, detokenize=True, structured output), before it takes any KV block.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NoReturn

from .tokenizer import Tokenizer, _as_id_list, _read_json

logger = logging.getLogger(__name__)


def has_tokenizer(model_dir: str | Path) -> bool:
    """Whether `model_dir` holds a tokenizer file moelink reads (tokenizer.json, or Kimi's tiktoken.model)."""
    return (Path(model_dir) / "tokenizer.json").is_file() or (Path(model_dir) / "tiktoken.model").is_file()


class NoTokenizer:
    """The tokenizer of a model directory that has none: token ids in, token ids out."""

    bos_token = eos_token = None
    bos_token_id = eos_token_id = None
    chat_template = None
    model_max_length = None
    clean_up_tokenization_spaces = False

    def __init__(self, model_dir: str | Path):
        self.name_or_path = str(model_dir)
        path = Path(model_dir)
        # The ids a real tokenizer would add to config.json's: generation_config.json's, when the file is there.
        self.eos_token_ids: set[int] = {*_as_id_list(_read_json(path / "config.json").get("eos_token_id")),
                                        *_as_id_list(_read_json(path / "generation_config.json").get("eos_token_id"))}
        self.special_tokens_map: dict[str, str] = {}
        self.all_special_ids: list[int] = []

    def error(self, what: str) -> ValueError:
        return ValueError(f"{what}, but model={self.name_or_path!r} has no tokenizer (no tokenizer.json in the "
                          f"directory; --load-format dummy runs without one): pass token ids as the prompt "
                          f"(prompt_token_ids) with SamplingParams(detokenize=False), or add the model's tokenizer "
                          f"files to the directory.")

    def check_request(self, field: str, prompt: Any, params) -> None:
        """Refuse a request that needs the vocabulary (ValueError naming what asked for it)."""
        if isinstance(prompt, str):
            raise self.error(f"{field} is text")
        if params.detokenize:
            raise self.error("SamplingParams.detokenize=True (the default) asks for text")
        if params.structured_outputs is not None:
            raise self.error("SamplingParams.structured_outputs needs the vocabulary")

    def _no_encode(self, *_args, **_kwargs) -> NoReturn:
        raise self.error("a text prompt was given")

    def _no_decode(self, *_args, **_kwargs) -> NoReturn:
        raise self.error("text was asked for")

    encode = encode_without_gil = encode_batch = apply_chat_template = convert_tokens_to_ids = _no_encode
    decode = convert_ids_to_tokens = _no_decode

    @property
    def backend(self) -> NoReturn:
        raise self.error("the tokenizer's definition was asked for")


def load_tokenizer(model_dir: str | Path, load_format: str = "auto") -> Tokenizer | NoTokenizer:
    """The model's tokenizer; a `NoTokenizer` for a dummy model (load_format "dummy") whose directory has none."""
    if load_format == "dummy" and not has_tokenizer(model_dir):
        logger.warning("model=%r has no tokenizer.json: the engine runs without a tokenizer (token-id prompts "
                       "with detokenize=False only).", str(model_dir))
        return NoTokenizer(model_dir)
    return Tokenizer.from_dir(model_dir)


__all__ = ["NoTokenizer", "has_tokenizer", "load_tokenizer"]
