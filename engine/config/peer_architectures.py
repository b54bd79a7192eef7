"""Every mixture-of-experts architecture the peer engines register, and why moelink does not serve the ones it does
not: the data of docs/models.md's generated table "Every MoE architecture vLLM and SGLang register"
(engine/config/arch_table.py renders it; tests/engine/test_arch_table.py keeps the page equal to it).

Read from the releases' own sources (issue 96): vLLM 0.33.0's `vllm/model_executor/models/registry.py` (the text
generation, multimodal and Transformers-backend tables: `_TEXT_GENERATION_MODELS`, `_MULTIMODAL_MODELS`,
`_TRANSFORMERS_SUPPORTED_MODELS`) and SGLang 0.5.23's `sglang/srt/models/*.py` (each file's `EntryClass`). A name is
here when the class it maps to builds a mixture-of-experts language model in its published checkpoints (an experts
block in the model file, or the MoE language model a multimodal wrapper builds); draft heads (NextN / MTP / EAGLE),
embedding, reward and classification names and the Transformers backend's generic classes are not. Judged dense,
though their files hold an experts block for other checkpoints: vLLM's PanguEmbeddedForCausalLM, Qwen3_5ForCausalLM,
MiniCPM3ForCausalLM, Qwen3_5ForConditionalGeneration, MiniCPMV, OpenPanguVL, StepVL, Cosmos3Edge and
NemotronH_Nano_VL_V2 (dense language models), DiffusionGemmaForBlockDiffusion (its Gemma 4 base unstated); SGLang's
Ernie4_5_ForCausalLM, HunYuanDenseV1ForCausalLM, MiniCPMSALAForCausalLM, SDARForCausalLM. Wrappers that build
whatever registered language model their config names (InternVLChatModel, the Llava family, Eagle2.5, ...) are not
counted as MoE architectures of their own.

What moelink serves is never written here: it is the registry's (engine/config/architectures.py: REGISTRY's
runnable names and TEXT_MODEL_OF's multimodal wrappers), and a name awaiting a transformers release says why in
engine/config/awaited.py. Every other name carries its reason here, and a name that becomes served loses it (the
test fails on a reason left beside a served name). No torch: the docs' generator and the test read it cheaply.
"""
from __future__ import annotations

from dataclasses import dataclass

VLLM_RELEASE = "0.33.0"
SGLANG_RELEASE = "0.5.23"


@dataclass(frozen=True)
class PeerArch:
    """One config.json `architectures` name a peer engine registers for an MoE model."""

    name: str
    engines: tuple[str, ...]  # "vllm", "sglang": which releases above register it
    # Why moelink does not serve it: "" where the registry serves it or engine/config/awaited.py names it.
    reason: str = ""


# Reasons that recur.
_NOT_BUILT = "transformers 5.24 defines it; its family package is not built yet"
_NO_ORACLE = ("no model in transformers 5.24 (the peers run their own code): no oracle to hold it to until one "
              "defines it or a public definition is re-derived")
_IMAGES = "its images are issue 98"


def _wrapper(text_model: str) -> str:
    return (f"multimodal: its language model is {text_model}, but the wrapper (its `text_config` and tensor prefix) "
            f"is not registered as a text-only name yet; {_IMAGES}")


_V, _S, _VS = ("vllm",), ("sglang",), ("vllm", "sglang")

PEER_ARCHITECTURES: tuple[PeerArch, ...] = (
    # vLLM's text generation table.
    PeerArch("AfmoeForCausalLM", _VS),
    PeerArch("AliceAIForCausalLM", _V, _NO_ORACLE),
    PeerArch("AXK1ForCausalLM", _V, f"A.X K1 (MLA + MoE): {_NOT_BUILT}"),
    PeerArch("BailingMoeForCausalLM", _VS, f"Ling 1.x (Ling-lite, Ling-plus): {_NO_ORACLE}"),
    PeerArch("BailingMoeV2ForCausalLM", _VS, f"Ling 2.0, Ring-1T: {_NO_ORACLE}"),
    PeerArch("BailingMoeV2_5ForCausalLM", _VS, "Ling 2.5: lightning linear attention, a block kind not built yet; "
                                               "no model in transformers 5.24"),
    PeerArch("BailingMoeV3ForCausalLM", _VS),
    PeerArch("BeamForCausalLM", _VS, f"Beam (SSMax query scaling): {_NOT_BUILT}"),
    PeerArch("Cohere2MoeForCausalLM", _VS),
    PeerArch("DbrxForCausalLM", _VS),
    PeerArch("DeepseekForCausalLM", _VS, "DeepSeek-MoE 16B: transformers 5.24 has no model for it (DeepSeek-V2 and "
                                         "V3 only), so no oracle to hold it to yet"),
    PeerArch("DeepseekV2ForCausalLM", _VS),
    PeerArch("DeepseekV3ForCausalLM", _VS),
    PeerArch("DeepseekV32ForCausalLM", _VS),
    PeerArch("DeepseekV4ForCausalLM", _VS),
    PeerArch("Ernie4_5_MoeForCausalLM", _VS),
    PeerArch("ExaoneMoeForCausalLM", _VS),
    PeerArch("ExaoneMoEForCausalLM", _VS),
    PeerArch("FlintForCausalLM", _V),
    PeerArch("Gemma4ForCausalLM", _VS),
    PeerArch("Qwen3NextForCausalLM", _VS),
    PeerArch("Qwen4ExpForCausalLM", _V),
    PeerArch("Glm4MoeForCausalLM", _VS),
    PeerArch("Glm4MoeLiteForCausalLM", _VS),
    PeerArch("GlmMoeDsaForCausalLM", _VS),
    PeerArch("Glm5NextForCausalLM", _V),
    PeerArch("GptOssForCausalLM", _VS),
    PeerArch("GraniteMoeForCausalLM", _VS),
    PeerArch("GraniteMoeHybridForCausalLM", _VS),
    PeerArch("GraniteMoeSharedForCausalLM", _VS),
    PeerArch("GraniteMoeSWAForCausalLM", _VS, f"Granite-MoE with sliding-window layers: {_NOT_BUILT} (the granitemoe "
                                              f"family reads the other two Granite-MoE names)"),
    PeerArch("HYV3ForCausalLM", _VS, f"Hy3: {_NOT_BUILT}"),
    PeerArch("HYV4ForCausalLM", _VS),
    PeerArch("JambaForCausalLM", _V),
    PeerArch("K2HorizonForCausalLM", _VS, "MoVA attention, a block kind not built yet; no model in transformers 5.24"),
    PeerArch("KimiLinearForCausalLM", _VS),
    PeerArch("Lfm2MoeForCausalLM", _VS),
    PeerArch("LagunaForCausalLM", _VS, _NOT_BUILT),
    PeerArch("Llama4ForCausalLM", _VS),
    PeerArch("LongcatFlashForCausalLM", _VS),
    PeerArch("LongcatFlashNgramForCausalLM", _V),  # awaited: engine/config/awaited.py
    PeerArch("MiniCPMForCausalLM", _VS, f"MiniCPM-MoE-8x2B (the dense MiniCPMs share the name): {_NO_ORACLE}"),
    PeerArch("MiniMaxM2ForCausalLM", _VS),
    PeerArch("MiniMaxM3SparseForCausalLM", _VS),
    PeerArch("InklingForCausalLM", _V, f"Inkling (short convolution + MoE): {_NOT_BUILT}"),
    PeerArch("InklingForConditionalGeneration", _VS, f"Inkling as published (multimodal): {_NOT_BUILT}; {_IMAGES}"),
    PeerArch("MistralLarge3ForCausalLM", _VS, "Mistral Large 3 in Mistral's own format (params.json, consolidated "
                                              "tensor names): that reader is not built yet; its DeepSeek-V3 "
                                              "architecture is served"),
    PeerArch("MixtralForCausalLM", _VS),
    PeerArch("MiMoV2FlashForCausalLM", _VS),
    PeerArch("MiMoV2ForCausalLM", _VS),
    PeerArch("NemotronHForCausalLM", _VS),
    PeerArch("NemotronHPuzzleForCausalLM", _VS, "Nemotron-H pruned by Puzzle (vLLM builds it as NemotronHForCausalLM): "
                                                "not registered as an alias yet, its per-layer shapes untested"),
    PeerArch("OlmoeForCausalLM", _VS),
    PeerArch("PanguProMoEV2ForCausalLM", _V, f"openPangu Pro MoE V2: {_NO_ORACLE}"),
    PeerArch("PanguUltraMoEForCausalLM", _V, f"openPangu Ultra MoE (MLA + MoE): {_NO_ORACLE}"),
    PeerArch("Param2MoEForCausalLM", _V, _NO_ORACLE),
    PeerArch("PhiMoEForCausalLM", _VS),
    PeerArch("Qwen2MoeForCausalLM", _VS),
    PeerArch("Qwen3MoeForCausalLM", _VS),
    PeerArch("Qwen3_5MoeForCausalLM", _VS),
    PeerArch("SarvamMoEForCausalLM", _VS),
    PeerArch("SarvamMLAForCausalLM", _VS),
    PeerArch("Step3TextForCausalLM", _V, "Step-3's text model: MFA attention, a block kind not built yet; no model "
                                         "in transformers 5.24"),
    PeerArch("Step3p5ForCausalLM", _VS, "Step-3.5-Flash: transformers 5.24 reads its config (model_type step3p5) "
                                        "and builds its model inside Step3p7ForConditionalGeneration alone; its "
                                        "family package is not built yet"),
    PeerArch("Step5ForCausalLM", _V, "an indexer over GQA (beside QSA), a block kind not built yet; no model in "
                                     "transformers 5.24"),
    # vLLM's multimodal table: MoE language models.
    PeerArch("AriaForConditionalGeneration", _V, f"multimodal Aria: {_NOT_BUILT} (its MoE text model too); {_IMAGES}"),
    PeerArch("BailingMoeV3VLForConditionalGeneration", _VS, _wrapper("Ling 3.0's (served: BailingMoeV3ForCausalLM)")),
    PeerArch("DeepseekVLV2ForCausalLM", _V, f"DeepSeek-VL2: its language model is DeepSeek-MoE's / V2's in a layout "
                                            f"transformers 5.24 has no model for; {_IMAGES}"),
    PeerArch("DeepseekOCRForCausalLM", _VS, "an OCR model (images in, text out: nothing to serve text-only; its "
                                            "DeepSeek-MoE decoder has no model in transformers 5.24)"),
    PeerArch("DeepseekOCR2ForCausalLM", _V, "an OCR model (images in, text out: nothing to serve text-only); no "
                                            "model in transformers 5.24"),
    PeerArch("UnlimitedOCRForCausalLM", _VS, "an OCR model (DeepSeek-OCR's, images in, text out: nothing to serve "
                                             "text-only); no model in transformers 5.24"),
    PeerArch("DeepseekV4ForConditionalGeneration", _V, _wrapper("DeepSeek-V4's (served: DeepseekV4ForCausalLM)")),
    PeerArch("DeepseekV41ForCausalLM", _V),
    PeerArch("Dots3NoteForCausalLM", _VS, f"dots3 note (multimodal): {_NOT_BUILT}; {_IMAGES}"),
    PeerArch("Ernie4_5_VLMoeForConditionalGeneration", _VS, f"ERNIE-4.5-VL: its text model routes text and image "
                                                            f"tokens to separate experts, not the served ERNIE-4.5 "
                                                            f"block; {_NOT_BUILT}; {_IMAGES}"),
    PeerArch("Gemma4ForConditionalGeneration", _VS),
    PeerArch("Gemma4UnifiedForConditionalGeneration", _VS, _wrapper("Gemma 4's (served: Gemma4ForCausalLM)")),
    PeerArch("Glm4vMoeForConditionalGeneration", _VS, _wrapper("GLM-4.5-Air's (served: Glm4MoeForCausalLM) with "
                                                               "3-D rope")),
    PeerArch("Glm5NextForConditionalGeneration", _VS),
    PeerArch("InternS1ForConditionalGeneration", _VS, _wrapper("Qwen3-MoE's (served: Qwen3MoeForCausalLM)")),
    PeerArch("InternS1ProForConditionalGeneration", _VS, f"Intern-S1-Pro: {_NO_ORACLE}; {_IMAGES}"),
    PeerArch("InternS2MobiusForConditionalGeneration", _VS, "the MetaMoe block, a block kind not built yet; no "
                                                            "model in transformers 5.24"),
    PeerArch("InternS2PreviewForConditionalGeneration", _VS, _wrapper("Qwen3.5-MoE's (served: Qwen3_5MoeForCausalLM)")),
    PeerArch("KimiVLForConditionalGeneration", _VS, _wrapper("DeepSeek-V3's architecture (served: "
                                                             "DeepseekV3ForCausalLM)")),
    PeerArch("KimiK25ForConditionalGeneration", _VS),
    PeerArch("KimiK3ForConditionalGeneration", _VS),
    PeerArch("Llama4ForConditionalGeneration", _VS),
    PeerArch("MiMoV2OmniForCausalLM", _V, _wrapper("MiMo-V2-Flash's (served: MiMoV2FlashForCausalLM)")),
    PeerArch("MiniMaxM3SparseForConditionalGeneration", _VS),
    PeerArch("Moondream3ForCausalLM", _V, f"Moondream 3 (its own MoE text model): {_NO_ORACLE}; {_IMAGES}"),
    PeerArch("HfMoondream", _V, f"Moondream 3's other name: {_NO_ORACLE}; {_IMAGES}"),
    PeerArch("MuseSparkForConditionalGeneration", _VS, f"compressed MoE, a block kind not built yet ({_NOT_BUILT})"),
    PeerArch("NemotronH_Nano_Omni_Reasoning_V3", _VS, _wrapper("Nemotron 3 Nano's (served: NemotronHForCausalLM)")),
    PeerArch("NemotronH_Super_Omni_Reasoning_V3", _V, _wrapper("Nemotron 3 Super's (served: NemotronHForCausalLM)")),
    PeerArch("NemotronH_Omni_Reasoning_V3", _VS, _wrapper("Nemotron 3's (served: NemotronHForCausalLM)")),
    PeerArch("Ovis2_6_MoeForCausalLM", _V, _wrapper("Qwen3-MoE's (served: Qwen3MoeForCausalLM)")),
    PeerArch("Qwen3OmniMoeForConditionalGeneration", _VS, _wrapper("the thinker's Qwen3-MoE (served: "
                                                                   "Qwen3MoeForCausalLM)")),
    PeerArch("Qwen3VLMoeForConditionalGeneration", _VS, _wrapper("Qwen3-MoE's (served: Qwen3MoeForCausalLM) with "
                                                                 "interleaved 3-D rope")),
    PeerArch("Qwen3_5MoeForConditionalGeneration", _VS),
    PeerArch("Qwen4ExpForConditionalGeneration", _VS),
    PeerArch("Step3VLForConditionalGeneration", _VS, f"Step-3: its text model's MFA attention is a block kind not "
                                                     f"built yet; {_IMAGES}"),
    PeerArch("Step3p7ForConditionalGeneration", _VS, f"Step-3.7-Flash: {_NOT_BUILT} (its text model is "
                                                     f"Step-3.5's); {_IMAGES}"),
    PeerArch("Step5ForConditionalGeneration", _V, f"Step5's multimodal wrapper: its text model is not built yet "
                                                  f"(Step5ForCausalLM); {_IMAGES}"),
    # vLLM's Transformers-backend table (TransformersMoEForCausalLM).
    PeerArch("FlexOlmoForCausalLM", _V),
    PeerArch("HunYuanMoEV1ForCausalLM", _VS),
    PeerArch("Kolibri1ForCausalLM", _V, _NOT_BUILT),
    PeerArch("MellumForCausalLM", _VS),
    # SGLang's own names (EntryClass) that vLLM 0.33 does not register.
    PeerArch("BailingMoEForCausalLM", _S, f"SGLang's spelling of BailingMoeForCausalLM (Ling 1.x): {_NO_ORACLE}"),
    PeerArch("BailingMMNativeForConditionalGeneration", _S, f"Ming-Omni (a Ling 2.0 MoE text model): {_NO_ORACLE}; "
                                                            f"{_IMAGES}"),
    PeerArch("BailingMM2NativeForConditionalGeneration", _S, f"Ming-Omni 2 (a Ling 2.0 MoE text model): "
                                                             f"{_NO_ORACLE}; {_IMAGES}"),
    PeerArch("DeepseekVL2ForCausalLM", _S, f"SGLang's spelling of DeepSeek-VL2: its language model is DeepSeek-MoE's "
                                           f"/ V2's in a layout transformers 5.24 has no model for; {_IMAGES}"),
    PeerArch("DotsVLMForCausalLM", _S, _wrapper("DeepSeek-V3's architecture (served: DeepseekV3ForCausalLM)")),
    PeerArch("GigaChat35ForCausalLM", _S, f"GigaChat 3.5 (MLA + gated DeltaNet): {_NO_ORACLE}"),
    PeerArch("Grok1ForCausalLM", _S, f"Grok-1, Grok-2 (vLLM dropped them in 0.24): {_NO_ORACLE}"),
    PeerArch("Grok1ModelForCausalLM", _S, f"Grok-1's other name: {_NO_ORACLE}"),
    PeerArch("IQuestQ1ForCausalLM", _S, _NO_ORACLE),
    PeerArch("KimiK3LinearForCausalLM", _S),
    PeerArch("LLaDA2MoeModelLM", _S, "LLaDA2.0-MoE: diffusion decoding (each step unmasks a block of tokens in "
                                     "parallel), which moelink's step seam, one token per sequence per step plus a "
                                     "speculative verify, does not take"),
    PeerArch("QuantMixtralForCausalLM", _S, "SGLang's second Mixtral class, not a name checkpoints write: Mixtral is "
                                            "served as MixtralForCausalLM"),
    PeerArch("SDARMoeForCausalLM", _S, "SDAR-MoE: diffusion decoding (blocks of tokens denoised in parallel), which "
                                       "moelink's one-token step seam does not take"),
    PeerArch("XllmForCausalLM", _S, "MoVA attention, a block kind not built yet; no model in transformers 5.24"),
    PeerArch("XverseMoeForCausalLM", _S, f"XVERSE-MoE: {_NO_ORACLE}"),
    PeerArch("ZayaForCausalLM", _S, f"CCA attention, a block kind not built yet ({_NOT_BUILT})"),
)

# Names issue 96 asks for that neither release above registers (vLLM dropped them in 0.23); transformers 5.24 ships
# the model. Listed after the peers' rows, not counted among them.
ALSO_NAMED: tuple[PeerArch, ...] = (
    PeerArch("MiniMaxForCausalLM", (), f"MiniMax-Text-01 / M1 (transformers' name): lightning linear attention, a "
                                       f"block kind not built yet"),
    PeerArch("MiniMaxText01ForCausalLM", (), "MiniMax-Text-01: lightning linear attention, a block kind not built yet"),
    PeerArch("MiniMaxM1ForCausalLM", (), "MiniMax-M1: lightning linear attention, a block kind not built yet"),
)

__all__ = ["ALSO_NAMED", "PEER_ARCHITECTURES", "PeerArch", "SGLANG_RELEASE", "VLLM_RELEASE"]
