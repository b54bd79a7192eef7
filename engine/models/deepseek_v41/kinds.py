"""DeepSeek-V4.1's registrations on the models side (engine/models/blocks/registry.py imports this module of every
family that has one): its block kinds (blocks.py) and its DSpark draft layers (dspark.py, in
engine/models/blocks/dspark.DSPARK_STAGES)."""
from . import blocks, dspark  # noqa: F401
