"""Where a model's files come from: `model` is a local checkpoint directory or a Hugging Face repo id.

`resolve_model_dir` turns what the user passed (`moelink serve Qwen/Qwen3-30B-A3B`, `LLM("org/name")`) into
the local directory everything else reads (config.json, safetensors, tokenizer), before anything reads it.
A repo id is looked up in the local Hugging Face cache first, so a cached model starts with no network call,
and is downloaded through `huggingface_hub` only when the hub is not offline. `huggingface_hub` owns the
cache layout (models--org--name/refs/<ref> → snapshots/<commit>); nothing here parses it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

# What the engine reads from a checkpoint: config, weights, tokenizer bundle (the names Hugging Face uses).
# Other files of a repo (PyTorch .bin duplicates, GGUF, images) are never downloaded.
ALLOW_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "tokenizer.model", "tiktoken.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")

_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), as huggingface_hub read it at import or as set since."""
    from huggingface_hub import constants

    env = any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return env or bool(constants.HF_HUB_OFFLINE)


def is_repo_id(model: str) -> bool:
    """True when `model` reads as a Hugging Face repo id ('org/name' or 'name'), not as a path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    # Path spellings are never ids, even when the hub's grammar would accept them.
    if not model or model.startswith(("/", ".", "~")) or os.sep != "/" and os.sep in model:
        return False
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def _what_to_do(model: str, offline: bool = True) -> str:
    reach = "allow downloads with HF_HUB_OFFLINE=0" if offline else "check the network (or HF_ENDPOINT)"
    return (f"check the id, download it with `huggingface-cli download {model}` (or `hf download {model}`), "
            f"{reach}, or pass a local checkpoint directory")


def _not_a_directory(model: str) -> str:
    """How messages say that `model` names no local directory: with the path it was looked for at, when it was
    more likely meant as a directory than as a repo id (see _path_like)."""
    return f"is not a local directory (no such directory: {os.path.abspath(model)})" if _path_like(model) \
        else "is not a local directory"


def _path_like(model: str) -> bool:
    """Whether a `model` that names no directory reads more as a mistyped path than as a repo id: a bare name
    (ids without an owner are rare; `make serve TINY_MODEL=tiny-modle` is not), or one whose parent directory
    exists here (`models/qwen3` beside a `models/` folder)."""
    return "/" not in model or Path(model).parent.is_dir()


def _has_checkpoint(path: str, weights: bool = True) -> bool:
    """A snapshot can hold only some files (another tool fetched config.json alone): such a one is refetched."""
    p = Path(path)
    return (p / "config.json").is_file() and (not weights or any(p.glob("*.safetensors")))


def resolve_model_dir(model: str, revision: Optional[str] = None, download_dir: Optional[str] = None,
                      weights: bool = True) -> str:
    """The local directory holding `model`'s checkpoint.

    A directory is itself (`revision` is refused there: it would be ignored and serve other weights than
    asked). Otherwise `model` must be a Hugging Face repo id: its snapshot for `revision` (a branch, tag or
    commit hash; default the repo's default branch) from the cache under `download_dir` (default
    HF_HUB_CACHE), downloaded when missing unless the hub is offline. Raises ValueError naming `model=`
    and saying what to do. `weights` False (load_format "dummy"): config.json and the tokenizer files only,
    no *.safetensors fetched.
    """
    if Path(model).is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} is invalid for model={model!r}: a revision picks a snapshot of "
                             f"a Hugging Face repo id, and this is a local directory; drop --revision.")
        return model
    if not is_repo_id(model):
        raise ValueError(f"model={model!r} is neither a local directory nor a Hugging Face repo id ('org/name'): "
                         f"pass a checkpoint directory (config.json, *.safetensors, tokenizer.json) or a repo id.")
    where = f" (revision={revision!r})" if revision else ""
    cached = _snapshot(model, revision, download_dir, local_files_only=True, weights=weights)
    if cached is not None and _has_checkpoint(cached, weights):
        return cached
    offline = hub_offline()
    if offline:
        if cached is not None:
            raise ValueError(f"model={model!r}{where}: the Hugging Face cache holds this snapshot without its "
                             f"config.json or *.safetensors, and the hub is offline (HF_HUB_OFFLINE=1): "
                             f"{_what_to_do(model)}.")
        cache = download_dir or _default_cache()
        raise ValueError(f"model={model!r}{where} {_not_a_directory(model)} and not in the Hugging Face cache "
                         f"({cache}), and the hub is offline (HF_HUB_OFFLINE=1): {_what_to_do(model)}.")
    if _path_like(model):
        # Said before the hub is asked (which can take a while to fail): most likely a path was mistyped.
        logger.warning("model=%r: no such directory (%s); looking it up as a Hugging Face repo id", model,
                       os.path.abspath(model))
    logger.info("downloading %s%s from the Hugging Face hub", model, where)
    path = _snapshot(model, revision, download_dir, local_files_only=False, weights=weights)
    if path is None or not _has_checkpoint(path, weights):
        raise ValueError(f"model={model!r}{where}: the Hugging Face repo has no config.json and *.safetensors "
                         f"weights; moelink loads safetensors checkpoints only.")
    return path


def _default_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _snapshot(model: str, revision: Optional[str], download_dir: Optional[str], *, local_files_only: bool,
              weights: bool = True) -> Optional[str]:
    """snapshot_download's path; None when not in the cache (local_files_only); hub errors → ValueError."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f" (revision={revision!r})" if revision else ""
    patterns = [p for p in ALLOW_PATTERNS if weights or "safetensors" not in p]
    try:
        return snapshot_download(model, revision=revision, cache_dir=download_dir, allow_patterns=patterns,
                                 local_files_only=local_files_only)
    except LocalEntryNotFoundError as e:
        if local_files_only:
            return None
        # Online but unreachable (no network, hub down): the hub's own reason is kept.
        raise ValueError(f"model={model!r}{where} {_not_a_directory(model)}, not in the Hugging Face cache and "
                         f"could not be downloaded "
                         f"({_first_line(e)}): {_what_to_do(model, offline=False)}.") from None
    except GatedRepoError:  # before RepositoryNotFoundError: it is one
        raise ValueError(f"model={model!r} is a gated Hugging Face repo: accept its terms on "
                         f"https://huggingface.co/{model} and log in (`hf auth login` or HF_TOKEN), or pass a "
                         f"local checkpoint directory.") from None
    except RepositoryNotFoundError:
        raise ValueError(f"model={model!r} {_not_a_directory(model)} and no Hugging Face repo of that id was found "
                         f"(or it is private: log in with `hf auth login` or HF_TOKEN): "
                         f"{_what_to_do(model, offline=False)}.") from None
    except RevisionNotFoundError:
        raise ValueError(f"revision={revision!r} is invalid for model={model!r}: the repo has no such branch, tag "
                         f"or commit.") from None
    except HfHubHTTPError as e:
        raise ValueError(f"model={model!r}{where}: the Hugging Face hub answered {_first_line(e)}: "
                         f"{_what_to_do(model, offline=False)}.") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
