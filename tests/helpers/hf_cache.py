"""A Hugging Face cache built on disk, laid out as huggingface_hub writes it, so that repo ids resolve offline."""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def add_snapshot(cache: Path, repo: str, commit: str, src: str, refs=("main",), **config_overrides) -> Path:
    """Copy checkpoint directory `src` in as `repo`'s snapshot `commit`, named by `refs`; returns the snapshot
    directory. `config_overrides` change its config.json."""
    from huggingface_hub.file_download import repo_folder_name

    repo_dir = cache / repo_folder_name(repo_id=repo, repo_type="model")
    snap = repo_dir / "snapshots" / commit
    shutil.copytree(src, snap)
    if config_overrides:
        cfg = json.loads((snap / "config.json").read_text())
        cfg.update(config_overrides)
        (snap / "config.json").write_text(json.dumps(cfg))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)
    return snap
