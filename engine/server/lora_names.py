"""The LoRA adapters `moelink serve` serves by name (docs/lora.md#serving-adapters): vLLM's `--lora-modules`, read at
start, and the adapters `POST /v1/load_lora_adapter` adds and `/v1/unload_lora_adapter` removes while it serves.

A request names its adapter by name (the OpenAI `model`, the moelink.v1 request's `lora_name`); the name resolves
here to the engine's LoRARequest. Each load gets a fresh `lora_int_id` (never reused), so an adapter unloaded and
loaded again under its name, from another directory, is another adapter for the prefix cache and the ranks' slots:
a request already running under the old one keeps it to its end. Loads are checked by the engine's AdapterChecker
(the adapter's config and tensor headers against the checkpoint: engine/lora/checker.py), on a worker thread, never
on the engine's step loop; the ranks read the weights when a request first names the adapter.
"""
from __future__ import annotations

import itertools
import json
import logging
import threading
import unicodedata
from dataclasses import dataclass
from typing import Optional

from ..contract.lora import LoRARequest
from ..contract.safe_text import shown

logger = logging.getLogger(__name__)

_MODULE_FIELDS = ("name", "path", "base_model_name")
# An adapter's name is listed to every client (/v1/models) and echoed in answers: bounded, printable.
MAX_NAME_CHARS = 256
# An adapter's directory: the longest path the OS resolves (PATH_MAX).
MAX_PATH_CHARS = 4096


def name_key(name: str) -> str:
    """What two names collide under: NFKC-normalised and case-folded ("Base" and "ｂａｓｅ" are "base")."""
    return unicodedata.normalize("NFKC", name).casefold()


def check_name(name: object, field: str) -> str:
    """`name` as an adapter's name; ValueError naming `field`: a non-empty string of at most MAX_NAME_CHARS printable
    characters (no control, format such as a zero-width space, or separator other than the space), no leading or
    trailing space."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"{field}={shown(str(name))} is invalid: must be a non-empty name without leading or "
                         "trailing spaces.")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"{field}={shown(name)} is invalid: at most {MAX_NAME_CHARS} characters.")
    if not name.isprintable():  # C* (controls, U+200B and other format characters) and Z* but the space
        raise ValueError(f"{field}={shown(name)} is invalid: it holds a control, format (zero-width) or separator "
                         "character; give a name of printable characters.")
    return name


def check_path(path: object, field: str) -> str:
    """`path` as an adapter's directory: a non-empty string of at most MAX_PATH_CHARS characters, no NUL."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH_CHARS or "\0" in path:
        raise ValueError(f"{field}={shown(str(path))} is invalid: must be the adapter's directory (at most "
                         f"{MAX_PATH_CHARS} characters).")
    return path


@dataclass(frozen=True)
class LoRAModule:
    """One `--lora-modules` entry: `name=path`, or vLLM's JSON `{"name", "path", "base_model_name"}`."""

    name: str
    path: str
    base_model_name: Optional[str] = None

    def __post_init__(self) -> None:
        check_name(self.name, "lora_modules name")
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"lora_modules path={self.path!r} (adapter {self.name!r}) is invalid: must be the "
                             "adapter's directory (adapter_config.json, adapter_model.safetensors).")
        if self.base_model_name is not None and (not isinstance(self.base_model_name, str)
                                                 or not self.base_model_name):
            raise ValueError(f"lora_modules base_model_name={self.base_model_name!r} (adapter {self.name!r}) is "
                             "invalid: must be a served model name, or left out.")


def parse_lora_module(text: str) -> LoRAModule:
    """A `--lora-modules` value as vLLM takes it: `name=path` or a JSON object; ValueError names what is wrong."""
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"lora_modules {text!r} is not valid JSON ({e}): give name=path or "
                             '{"name": ..., "path": ..., "base_model_name": ...}.') from None
        if not isinstance(data, dict):
            raise ValueError(f"lora_modules {text!r} is invalid: the JSON form is an object.")
        unknown = sorted(set(data) - set(_MODULE_FIELDS))
        if unknown:
            raise ValueError(f"lora_modules {text!r} is invalid: {unknown[0]!r} is not a field of it (it takes "
                             f"{', '.join(_MODULE_FIELDS)}).")
        if "name" not in data or "path" not in data:
            raise ValueError(f"lora_modules {text!r} is invalid: it needs \"name\" and \"path\".")
        return LoRAModule(data["name"], data["path"], data.get("base_model_name"))
    name, sep, path = text.partition("=")
    if not sep:
        raise ValueError(f"lora_modules {text!r} is invalid: give name=path or "
                         '{"name": ..., "path": ..., "base_model_name": ...}.')
    return LoRAModule(name, path)


class AdapterNotFound(KeyError):
    """No adapter of that name is served (HTTP 404, as vLLM answers an unload of an unknown name)."""


class ServedAdapters:
    """name -> LoRARequest of the adapters served now. Thread-safe: loads run on worker threads."""

    def __init__(self, checker, base_names: tuple[str, ...]):
        """`checker`: the engine's AdapterChecker (None: the engine serves no adapters); `base_names`: the names
        the base model is served under (an adapter may not take one, in any case or Unicode form: `name_key`)."""
        self.checker = checker
        self.base_names = frozenset(base_names)
        self._base_keys = frozenset(name_key(n) for n in base_names)
        self._by_name: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.checker is not None

    def get(self, name: str) -> Optional[LoRARequest]:
        return self._by_name.get(name)

    def served(self) -> list[LoRARequest]:
        """The adapters served now, in load order."""
        with self._lock:
            return list(self._by_name.values())

    def add(self, name: str, path: str, field: str = "lora_name", replace: bool = False) -> LoRARequest:
        """Check the adapter at `path` against the served checkpoint and serve it as `name`; blocking (its files'
        headers are read: call it off the event loop). ValueError names `field` (the name) or the adapter's path.
        `replace` (vLLM's load_inplace, an RL trainer's adapter each step): a name already served is given the new
        files under a new adapter id once they pass the check (the requests running under the old id keep it to their
        end), and keeps the old files when they fail."""
        if self.checker is None:
            raise ValueError(f"{field}={shown(str(name))} is refused: this server serves no LoRA adapters; start it "
                             "with --enable-lora.")
        check_name(name, field)
        check_path(path, "lora_path")
        key = name_key(name)
        if key in self._base_keys:
            raise ValueError(f"{field}={shown(name)} is invalid: it is a name of the base model (names are compared "
                             "ignoring case and Unicode form); give the adapter its own.")
        with self._lock:  # held through the check: a second load of one name waits, then is refused
            taken = next((n for n in self._by_name if name_key(n) == key), None)
            if taken is not None and not (replace and taken == name):
                raise ValueError(f"{field}={shown(name)} is invalid: the adapter {shown(taken)} has already been "
                                 "loaded under that name (compared ignoring case); unload it first.")
            request = LoRARequest(name, next(self._ids), path)
            try:
                self.checker.check(request)
            except ValueError as e:
                raise ValueError(f"adapter {shown(name)} (lora_path={shown(path)}) is refused: "
                                 f"{shown(str(e), 800, quote=False)}") from None
            except Exception as e:  # noqa: BLE001  (one clear refusal, never a dropped connection)
                logger.warning("adapter %s (lora_path=%s): the check failed: %s", shown(name), shown(path),
                               shown(repr(e)))
                raise ValueError(f"adapter {shown(name)} (lora_path={shown(path)}) is refused: it could not be "
                                 "read as a peft adapter.") from None
            self._by_name[name] = request
            return request

    def remove(self, name: str) -> LoRARequest:
        """Stop serving `name`: new requests naming it are refused; the running ones keep it to their end."""
        with self._lock:
            request = self._by_name.pop(name, None)
        if request is None:
            raise AdapterNotFound(name)
        return request
