"""DeepSeek-V4's registrations on the models side (engine/models/blocks/registry.py imports this module of every
family that has one): its block kinds (blocks.py) and its MTP layout (mtp.py)."""
from . import blocks, mtp  # noqa: F401
