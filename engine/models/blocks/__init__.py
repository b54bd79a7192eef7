"""The decoder's block kinds, each registered by name (registry.py): attention (attention.py), FFN (ffn.py),
residual (residual.py: the layer classes), embedding and head (ends.py), checkpoint mapping (checkpoint.py), and the
MTP layouts a family adds (mtp.py). engine/models/moe_decoder.py composes a model from them; a family adds its kinds
from its own package (engine/models/deepseek_v4/)."""
