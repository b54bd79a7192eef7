"""Tiny checkpoints dressed as real families for chat: the family's special tokens in the tokenizer (one token
each, as in the published tokenizers) and a chat template in the family's format (its role markers, its tool
declarations), so the smg gateway's tool-call and reasoning parsers see what they would see from the real model.

The templates are written here in each family's format, shortened (no multi-turn tool results, no system-prompt
defaults), not the published files. The tool-call and thinking markers are added as non-special tokens so that
they survive detokenization with skip_special_tokens (Qwen3's and GLM's tokenizers mark them so too).

Each family: the tiny architecture it runs on (make_family_model: make_tiny_model's, or gpt-oss's and MiniMax-M2's
own built by transformers), its parser names, its tokens, its template, and the text the family emits for a tool
call and for a thought (what a test forces with a grammar).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moelink.engine.tools.tiny_corpus import train_tiny_tokenizer

VOCAB = 512  # the model's vocabulary; the tokenizer is trained smaller and the family's tokens fill the rest
MAX_ADDED = 24

QWEN3_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n\nFunctions you may call, one JSON signature per line:\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n\nCall one as <tool_call>\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
KIMI_K2_TEMPLATE = (
    "{%- if tools %}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}<|im_user|>user<|im_middle|>"
    "{%- elif m.role == 'assistant' %}<|im_assistant|>assistant<|im_middle|>"
    "{%- else %}<|im_system|>{{ m.role }}<|im_middle|>{%- endif %}{{ m.content }}<|im_end|>{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{%- endif %}")
DEEPSEEK_V3_TEMPLATE = (
    "<｜begin▁of▁sentence｜>{%- if tools %}## Tools\n\nFunctions you may call:\n{%- for tool in tools %}\n"
    "{{ tool | tojson }}{%- endfor %}\n{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}<｜User｜>{{ m.content }}"
    "{%- else %}<｜Assistant｜>{{ m.content }}<｜end▁of▁sentence｜>{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<｜Assistant｜><think>\n{%- endif %}")
GLM45_TEMPLATE = (
    "[gMASK]<sop>{%- if tools %}<|system|>\n# Tools\n\nFunctions you may call:\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n\nCall one as <tool_call>{name}\n"
    "<arg_key>{key}</arg_key>\n<arg_value>{value}</arg_value>\n</tool_call>{%- endif %}"
    "{%- for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{%- endif %}")
# gpt-oss's harmony format: every message `<|start|>{role}<|message|>...<|end|>`, the tools declared by the developer
# message as a TypeScript namespace; the answer picks its channel (analysis, commentary, final) after <|channel|>.
GPT_OSS_TEMPLATE = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nReasoning: medium\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message."
    "{% if tools %}{{ '\\n' }}Calls to these tools must go to the commentary channel: 'functions'.{% endif %}<|end|>"
    "{% if tools %}<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n"
    "{% for tool in tools %}{{ '\\n' }}// {{ tool.function.description }}\ntype {{ tool.function.name }} = "
    "(_: {{ tool.function.parameters | tojson }}) => any;\n{% endfor %}{{ '\\n' }}} // namespace functions<|end|>"
    "{% endif %}"
    "{% for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}")
# MiniMax-M2: `]~b]{role}` ... `[e~[`, the tools as <tool> JSON lines in the system message, the generation prompt
# opening the thought (as the published template does), so an answer (a tool call too) follows its </think>.
# (The engine's Jinja trims the newline after a block tag, as transformers' does: newlines there are {{ '\n' }}.)
MINIMAX_M2_TEMPLATE = (
    "]~!b[]~b]system\nYou are a helpful assistant."
    "{% if tools %}{{ '\\n\\n' }}# Tools\nYou may call one or more tools to assist with the user query.\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}<tool>{{ tool.function | tojson }}</tool>{% endfor %}{{ '\\n' }}</tools>\n\n"
    "Call one as:\n<minimax:tool_call>\n<invoke name=\"tool-name\">\n<parameter name=\"key\">value</parameter>\n"
    "</invoke>\n</minimax:tool_call>{% endif %}[e~[\n"
    "{% for m in messages %}]~b]{{ 'ai' if m.role == 'assistant' else m.role }}\n{{ m.content }}[e~[\n{% endfor %}"
    "{% if add_generation_prompt %}]~b]ai\n<think>\n{% endif %}")


@dataclass(frozen=True)
class Family:
    arch: str  # the tiny architecture the family's models are
    tool_call_parser: str  # smg's names (gpt-oss: vLLM's, which moelink translates)
    reasoning_parser: str
    role_tokens: tuple[str, ...]  # special: the prompt's markers (and an answer's, for harmony)
    text_tokens: tuple[str, ...]  # tool-call and thinking markers: not special, they reach the parsers
    template: str
    tool_call: Callable[[str, dict], str]  # (name, arguments) -> what the model emits
    thought: Callable[[str, str], str]  # (reasoning, answer) -> what the model emits
    reply_tokens: tuple[str, ...] = ()  # of role_tokens, those only an answer holds (never a rendered prompt)


FAMILIES = {
    "qwen3": Family(
        "qwen3_moe", "qwen", "qwen3", (), ("<tool_call>", "</tool_call>", "<think>", "</think>"), QWEN3_TEMPLATE,
        lambda name, args: f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>',
        lambda r, a: f"<think>{r}</think>{a}"),
    "kimi_k2": Family(
        "deepseek_v3", "kimik2", "kimi", ("<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>"),
        ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
         "<|tool_call_argument_begin|>", "<|tool_call_end|>", "◁think▷", "◁/think▷"), KIMI_K2_TEMPLATE,
        lambda name, args: (f"<|tool_calls_section_begin|><|tool_call_begin|>functions.{name}:0"
                            f"<|tool_call_argument_begin|>{json.dumps(args)}<|tool_call_end|>"
                            "<|tool_calls_section_end|>"),
        lambda r, a: f"◁think▷{r}◁/think▷{a}"),
    # R1-style: the generation prompt opens the thought, so an answer (a tool call too) follows its </think>.
    "deepseek_r1": Family(
        "deepseek_v3", "deepseek", "deepseek_r1", ("<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                                                    "<｜end▁of▁sentence｜>"),
        ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
         "<｜tool▁sep｜>", "<think>", "</think>"), DEEPSEEK_V3_TEMPLATE,
        lambda name, args: (f"</think><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n"
                            f"```json\n{json.dumps(args)}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
        lambda r, a: f"{r}</think>{a}"),
    "glm45": Family(
        "glm4_moe", "glm45_moe", "glm45", ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                                           "<|observation|>"),
        ("<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "<think>",
         "</think>"), GLM45_TEMPLATE,
        lambda name, args: f"<tool_call>{name}\n" + "".join(
            f"<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>\n" for k, v in args.items()) + "</tool_call>",
        lambda r, a: f"<think>{r}</think>{a}", reply_tokens=("<|observation|>",)),
    # vLLM's parser names: moelink hands smg none for them, as smg has no parser flag for harmony: it reads gpt-oss
    # (GptOssForCausalLM) in a pipeline of its own, with openai-harmony's published encoding
    # (tests/server/test_tool_calls.py says what that means here).
    # Harmony's markers are special tokens in the published tokenizer; its parser reads token ids, not text.
    "gpt_oss": Family(
        "gpt_oss", "openai", "openai_gptoss",
        ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|call|>", "<|return|>"), (),
        GPT_OSS_TEMPLATE,
        lambda name, args: (f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>"
                            f"{json.dumps(args)}<|call|>"),
        lambda r, a: f"<|channel|>analysis<|message|>{r}<|end|><|start|>assistant<|channel|>final<|message|>{a}",
        reply_tokens=("<|channel|>", "<|constrain|>", "<|call|>", "<|return|>")),
    "minimax_m2": Family(
        "minimax", "minimax_m2", "minimax", ("]~!b[", "]~b]", "[e~["),
        ("<minimax:tool_call>", "</minimax:tool_call>", "<think>", "</think>"), MINIMAX_M2_TEMPLATE,
        lambda name, args: (f"</think>\n<minimax:tool_call>\n<invoke name=\"{name}\">\n" + "".join(
            f"<parameter name=\"{k}\">{v}</parameter>\n" for k, v in args.items())
            + "</invoke>\n</minimax:tool_call>"),
        lambda r, a: f"{r}</think>{a}"),
}


def make_family_model(out: str | Path, family: Family) -> Path:
    """A tiny random checkpoint of the family's architecture (vocab_size VOCAB), not yet dressed."""
    out = Path(out)
    if family.arch == "gpt_oss":  # transformers' own GptOssForCausalLM (tests/helpers/gpt_oss_checkpoints.py)
        import torch

        from tests.helpers.gpt_oss_checkpoints import save_gpt_oss
        save_gpt_oss(out, dtype=torch.float32, vocab_size=VOCAB, max_position_embeddings=1024)
    elif family.arch == "minimax":  # transformers' own MiniMaxM2ForCausalLM, m2_checkpoints.py's shape, our vocab
        import transformers

        from moelink.engine.tools.tiny_corpus import train_tiny_tokenizer, write_tokenizer_configs
        from tests.helpers.m2_checkpoints import M2_TINY

        config_cls, model_cls, fields = M2_TINY["minimax"]
        cfg = getattr(transformers, config_cls)(vocab_size=VOCAB, max_position_embeddings=1024,
                                                 initializer_range=0.1, **fields)
        cfg.architectures = [model_cls]
        getattr(transformers, model_cls)(cfg).save_pretrained(out)
        write_tokenizer_configs(out, train_tiny_tokenizer(VOCAB - MAX_ADDED), 1024)  # dress() writes the rest
    else:
        from moelink.engine.tools.tiny_model import make_tiny_model
        make_tiny_model(out, family.arch, vocab_size=VOCAB, max_position_embeddings=1024)
    return out


def dress(model_dir: str | Path, family: Family) -> None:
    """Give a tiny checkpoint (vocab_size VOCAB, from make_tiny_model) the family's tokens and chat template."""
    from tokenizers import AddedToken

    out = Path(model_dir)
    assert len(family.role_tokens) + len(family.text_tokens) <= MAX_ADDED
    tok = train_tiny_tokenizer(VOCAB - MAX_ADDED)  # the same three specials first: EOS ids stay as written
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family.role_tokens])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.text_tokens])
    assert tok.get_vocab_size() <= VOCAB
    tok.save(str(out / "tokenizer.json"))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = family.template
    cfg["added_tokens_decoder"] = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tok.get_added_tokens_decoder().items())}
    cfg_path.write_text(json.dumps(cfg, indent=2))

