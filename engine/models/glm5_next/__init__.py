"""GLM-5.3-Flash (transformers' glm5_next): the text model of its multimodal checkpoint (ARCHITECTURE.md: How to add a
model family)."""
