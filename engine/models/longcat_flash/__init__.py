"""LongCat-Flash (Meituan): MLA with LoRA-scaled latents, zero-computation experts, and the shortcut-connected MoE
(each transformers layer two attention + dense-MLP sublayers, its routed experts computed from the first and added
after the second): its registry entry (config.py), config reader (reader.py), residual and checkpoint kinds
(kinds.py) and tiny model (tiny.py)."""
