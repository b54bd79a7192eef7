"""Weights files as readable as the other files of a checkpoint.

safetensors' `save_file` (and transformers' `save_pretrained`, through it) writes each file through a temporary
file and renames it, so a checkpoint's weights end up mode 0600 whatever the umask, while its config.json and
tokenizer files, written with open(), get 0666 minus the umask (0644 under the usual 022): a checkpoint made
for a server running as another user, or copied into a shared cache, would load its config and then fail on
its weights.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def umask_mode(paths: Iterable[Path]) -> None:
    """Set each file's mode to what open() would have created it with: 0666 minus the process umask."""
    mask = os.umask(0)  # reading the umask means setting it: put back at once
    os.umask(mask)
    for path in paths:
        os.chmod(path, 0o666 & ~mask)
