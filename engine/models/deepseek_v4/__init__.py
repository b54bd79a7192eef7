"""DeepSeek-V4 (Flash, Pro; issue 45), one package: its block kinds for the one decoder (blocks.py registers the
"dsv4" attention, the "token_routed" FFN, the "hyper" residual, the "hc_streams" / "hc_head" ends and the
"published" checkpoint kind), its attention (attention.py, decode.py), its state rollback (rollback.py), its
hyper-connections (hyper_connections.py), its published FP8 weights (weights.py) and its MTP draft head (mtp.py,
registered as the "dsv4" MTP layout). engine/models/__init__.py imports it: that line is the family's whole
registration."""
from . import blocks, mtp  # noqa: F401  (register the kinds and the MTP layout)
