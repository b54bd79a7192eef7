"""A transformers config saved as a checkpoint directory's config.json, optionally edited as raw JSON (a field
transformers would not let its config class hold, or a value to refuse): for tests of config reading."""
from __future__ import annotations

import json
from typing import Callable


def config_dir(tmp_path, cfg, edit: Callable[[dict], None] | None = None) -> str:
    cfg.save_pretrained(tmp_path)
    if edit is not None:
        raw = json.loads((tmp_path / "config.json").read_text())
        edit(raw)
        (tmp_path / "config.json").write_text(json.dumps(raw))
    return str(tmp_path)


def set_fields(**fields) -> Callable[[dict], None]:
    """An `edit` that sets config.json fields."""
    return lambda raw: raw.update(fields)


__all__ = ["config_dir", "set_fields"]
