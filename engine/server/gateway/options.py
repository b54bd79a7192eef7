"""What `moelink serve` asks of the OpenAI HTTP gateway beyond serving its worker, and the vLLM flags that ask it.

The rest of the server holds these as `GatewayOptions` (the flags' values as the user gave them) and never sees
smg's command line: `args()` translates them (vLLM's parser names as smg spells them, quirks.smg_parser_name), for
the managed gateway (supervisor.py) and for the commands of one started by hand (front_cli.py).

The vLLM flags the gateway reads are registered here (`add_gateway_flags`, on `moelink serve`'s group of vLLM's
server flags) and listed in `GATEWAY_FLAGS`; engine/api/vllm_flag_table.py, a floor below that cannot import this
package, marks their rows `http_gateway` (tests/server/test_gateway_options.py keeps the two equal).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from ...api.vllm_flag_table import row
from .parsers import check_parser_name
from .quirks import VLLM_REASONING_PARSERS, VLLM_TOOL_CALL_PARSERS, smg_parser_name

# vLLM's spellings of the flags the gateway reads (each a row of engine/api/vllm_flag_table.py marked http_gateway).
GATEWAY_FLAGS = ("--chat-template", "--tool-call-parser", "--enable-auto-tool-choice", "--disable-auto-tool-choice",
                 "--reasoning-parser")


@dataclass(frozen=True)
class GatewayOptions:
    """The OpenAI HTTP gateway's options: the parsers that read tool calls and reasoning out of chat answers (vLLM's
    names or smg's own), and the chat template file it renders chats with. Parser names smg does not know are
    refused where the options are made (parsers.check_parser_name), before any weight loads."""

    tool_call_parser: Optional[str] = None
    reasoning_parser: Optional[str] = None
    chat_template: Optional[str] = None  # a file, checked by chat_template.check_chat_template

    def __post_init__(self) -> None:
        for name in ("tool_call_parser", "reasoning_parser", "chat_template"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name}={value!r} is invalid: give a name (or leave it unset).")
        # Against smg's own registry now, not when smg starts after the weights have loaded (check_parser_name).
        check_parser_name("--tool-call-parser", self.tool_call_parser, self._parser("tool_call"), "tool_call",
                          VLLM_TOOL_CALL_PARSERS)
        check_parser_name("--reasoning-parser", self.reasoning_parser, self._parser("reasoning"), "reasoning",
                          VLLM_REASONING_PARSERS)

    def _parser(self, kind: str) -> Optional[str]:
        return smg_parser_name(kind, self.tool_call_parser if kind == "tool_call" else self.reasoning_parser)

    def args(self) -> tuple[str, ...]:
        """smg's command-line arguments for these options (vLLM's parser names as smg's)."""
        args: list[str] = []
        for flag, value in (("--tool-call-parser", self._parser("tool_call")),
                            ("--reasoning-parser", self._parser("reasoning")), ("--chat-template", self.chat_template)):
            if value is not None:
                args += [flag, value]
        return tuple(args)


def gateway_options(ns: argparse.Namespace) -> GatewayOptions:
    """The gateway's options `moelink serve`'s flags (add_gateway_flags) ask for; ValueError names the flag."""
    if ns.enable_auto_tool_choice and ns.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (which parser reads the model's tool "
                         "calls).")
    return GatewayOptions(tool_call_parser=ns.tool_call_parser, reasoning_parser=ns.reasoning_parser,
                          chat_template=ns.chat_template)


def gateway_args(ns: argparse.Namespace) -> tuple[str, ...]:
    """The managed gateway's (smg) command-line arguments these flags ask for (vLLM's parser names as smg's)."""
    return gateway_options(ns).args()


def add_gateway_flags(g: argparse._ActionsContainer) -> None:
    """vLLM's flags the gateway reads, on `moelink serve`'s parser (`g`: a parser or its group of vLLM's flags)."""
    g.add_argument("--chat-template", default=None, metavar="PATH",
                   help="a Jinja chat template file for the OpenAI API's chats (given to the managed gateway, which "
                        "renders them; default: the checkpoint's); checked before the weights load: a regular file "
                        "of at most 1 MiB, UTF-8, that compiles with jinja2 (a path, not an inline template)")
    g.add_argument("--tool-call-parser", default=None, metavar="NAME",
                   help="the managed gateway's tool-call parser (smg's names: deepseek, kimik2, qwen, glm45_moe, "
                        "minimax_m2, ...; vLLM's where they differ: hermes, kimi_k2, glm45, deepseek_v3, openai "
                        "for gpt-oss, ...): tool_calls in chat responses")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted with --tool-call-parser (the gateway parses tool calls whenever a parser is set)")
    g.add_argument("--disable-auto-tool-choice", dest="enable_auto_tool_choice", action="store_false",
                   default=argparse.SUPPRESS, help=row("--disable-auto-tool-choice").says)
    g.add_argument("--reasoning-parser", default=None, metavar="NAME",
                   help="the managed gateway's reasoning parser (smg's names: deepseek_r1, qwen3, glm45, kimi, "
                        "minimax, ...; vLLM's where they differ: kimi_k2, minimax_m2, openai_gptoss for gpt-oss): "
                        "the reasoning split out of chat responses (as vLLM's `reasoning`)")


def model_alias_refusal(name: str) -> Optional[str]:
    """Why `name` cannot be one of the model's further names (given to the gateway as `--model-alias NAME=FIRST`,
    alias_args), or None."""
    if "=" in name:
        return "cannot contain '=': the OpenAI gateway (smg) reads its aliases as NAME=MODEL"
    return None


def alias_args(served_model_name: Optional[str], aliases) -> list[str]:
    """smg's flags that route each of `aliases` to the worker's `served_model_name`."""
    if not served_model_name:
        return []
    return [arg for alias in aliases for arg in ("--model-alias", f"{alias}={served_model_name}")]
