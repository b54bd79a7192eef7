"""DeepSeek-V4's registrations on the models side (engine/models/blocks/registry.py imports this module of every
family that has one): its block kinds (blocks.py), its MTP layout (mtp.py) and its DSpark stages (dspark.py)."""
from . import blocks, dspark, mtp  # noqa: F401
