"""DeepSeek-V4.1's registrations on the models side (engine/models/blocks/registry.py imports this module of every
family that has one): its block kinds (blocks.py)."""
from . import blocks  # noqa: F401
