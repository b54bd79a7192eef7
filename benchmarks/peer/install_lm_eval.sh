#!/usr/bin/env bash
# lm-eval's own venv for the lm-eval comparison (benchmarks/peer/lm_eval_compare.py; docs/vllm-compat.md#lm-eval),
# OUTSIDE the product: lm-eval is not a dependency of moelink, of its lock or of CI.
#
#   bash benchmarks/peer/install_lm_eval.sh [VENV]          # default .peer/lmeval-venv in the repo root (git-ignored)
#
# What goes in, and why:
#   - `lm-eval[api]` pinned: the `local-completions` and `local-chat-completions` models (the `api` extra brings
#     aiohttp, requests, tenacity, tiktoken); its base requirements read local JSON data sets (`datasets`).
#   - transformers (no torch): `tokenizer_backend=huggingface` tokenizes with AutoTokenizer on the checkpoint folder,
#     which transformers does without torch ("PyTorch was not found" is a warning only).
# Idempotent: a second run finds everything installed and only re-checks.
set -euo pipefail

LM_EVAL_SPEC="${LM_EVAL_SPEC:-lm-eval[api]==0.4.13}"
TRANSFORMERS_SPEC="${TRANSFORMERS_SPEC:-transformers>=4.45}"
PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$ROOT/.peer/lmeval-venv}"
PY="$VENV/bin/python"
LM_EVAL_VERSION="${LM_EVAL_SPEC##*==}"

echo "lm-eval venv: $VENV ($LM_EVAL_SPEC, $TRANSFORMERS_SPEC)"
test -x "$PY" || "$PYTHON" -m venv "$VENV"
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('lm_eval') != '$LM_EVAL_VERSION')" 2>/dev/null \
   || ! "$PY" -c "import aiohttp, tenacity, transformers" 2>/dev/null; then
    "$PY" -m pip install -q --upgrade pip >/dev/null
    "$PY" -m pip install -q "$LM_EVAL_SPEC" "$TRANSFORMERS_SPEC"
fi

# The checks: the CLI runs and both API models are registered.
echo "venv size: $(du -sh "$VENV" | cut -f1)"
"$PY" - <<'PY'
import importlib.metadata as m

from lm_eval.api.registry import get_model

for name in ("local-completions", "local-chat-completions"):
    get_model(name)
print("lm_eval", m.version("lm_eval"), "| transformers", m.version("transformers"),
      "| local-completions, local-chat-completions: ok")
PY
"$VENV/bin/lm_eval" --help >/dev/null && echo "lm_eval --help: ok"
