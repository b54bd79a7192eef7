"""FlexOlmo (allenai/FlexOlmo-7x7B-1T and its -RT): its architecture entry (config.py), config reader (reader.py) and
block kinds (kinds.py: OLMo 2's norms after the attention and the FFN, none before). Its attention is OLMo 2's GQA
(q/k RMSNorm over all heads at once, GQAConfig's "all_heads"), its FFN OLMoE's softmax top-k routed experts in every
layer. Its tiny checkpoints (`moelink make-tiny-model --arch`): tiny.py."""
