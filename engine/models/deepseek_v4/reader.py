"""DeepSeek-V4's config reader (engine/config/hf_readers.py calls it): engine/config/dsv4.py's, where the
configuration types its layers share with the rank live."""
from __future__ import annotations

from ...config.dsv4 import read_dsv4 as read

__all__ = ["read"]
