# Sourced by benchmarks/gpu_session.sh: what travels with a device command beside the working tree, and what a
# step needs from it. (Not a script of its own: it uses the main script's REPO, STATE, PY, MODE, say, plan_only.)
#
# The commit. Result files of the first plan are named <what>_<device>_<commit>; the device tool copies the working
# tree (uncommitted changes too) and perhaps not .git, so the commit is, in this order:
#   MOELINK_COMMIT=<hash>                  given in the command (letters, digits, '.', '_', '-' kept);
#   git rev-parse --short HEAD             where git works and tracked files equal HEAD;
#   .gpu_session/carry/commit              written by `bash benchmarks/gpu_session.sh prepare` here, carried (before
#                                          a dirty git: the device's .git can be older than the tree it got);
#   git's hash with "-dirty"               where tracked files differ from HEAD and nothing was carried;
#   "nocommit"                             and the log says how to fix it.
# Benchmarks that record "commit": "unknown" (no git where they ran) get the resolved commit written in.
#
# The serving wheels. `moelink serve` imports grpcio >= 1.85.1 and protobuf >= 7.35 (the committed stubs'
# versions), grpcio-health-checking, grpcio-reflection and smg-grpc-proto; the GPU image has no smg-grpc-proto,
# health or reflection (KINDS.md's package list) and cannot reach a registry. `prepare` downloads those five at
# requirements/lock-gpu.txt's pins as CPython 3.12 manylinux wheels (~8 MB) into .gpu_session/carry/wheels; a step
# whose serving part cannot import installs them with pip --no-index --target .gpu_session/site first, and runs
# without its serving part (one SKIPPED line) when they are not there either.

CARRY="$STATE/carry"
SERVE_WHEELS=(grpcio protobuf grpcio-health-checking grpcio-reflection smg-grpc-proto)
# What `moelink serve` (engine/server/server.py, vllm_engine.py) imports beyond the engine.
SERVE_MODULES=(grpc google.protobuf grpc_health.v1.health grpc_reflection.v1alpha.reflection
               smg_grpc_proto.generated.vllm_engine_pb2_grpc moelink.engine.server.server)

COMMIT=""
COMMIT_FROM=""
git_commit_here() {  # short hash of HEAD, "-dirty" when tracked files differ; nothing where git does not work
  local c
  c=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null) || return 1
  [[ -n $c ]] || return 1
  git --no-optional-locks -C "$REPO" diff --quiet HEAD -- 2>/dev/null || c="$c-dirty"
  printf '%s\n' "$c"
}
resolve_commit() {  # sets COMMIT and COMMIT_FROM (see the header); exports MOELINK_COMMIT for the benchmarks
  local git_c=""
  git_c=$(git_commit_here) || git_c=""
  if [[ -n ${MOELINK_COMMIT:-} ]]; then
    COMMIT=$(safe_name "$MOELINK_COMMIT") COMMIT_FROM="MOELINK_COMMIT"
  elif [[ -n $git_c && $git_c != *-dirty ]]; then
    COMMIT=$git_c COMMIT_FROM="git"
  elif [[ -s "$CARRY/commit" ]]; then
    # Before a dirty git: the device machine's copy of .git can be the one of the session's start while the tree
    # is newer (seen 2026-11-25: HEAD said 76aee34 under a15b7f5's tree); prepare stamped the tree just before.
    COMMIT=$(safe_name "$(head -n 1 "$CARRY/commit")") COMMIT_FROM=".gpu_session/carry/commit"
  elif [[ -n $git_c ]]; then
    COMMIT=$git_c COMMIT_FROM="git"
  else
    COMMIT=nocommit
    COMMIT_FROM="nowhere: no git here, no MOELINK_COMMIT, no .gpu_session/carry/commit (run \`bash benchmarks/gpu_session.sh prepare\` before the lease and carry .gpu_session/carry, or give MOELINK_COMMIT=<hash>)"
  fi
  [[ $COMMIT == nocommit ]] || export MOELINK_COMMIT=$COMMIT
}

# stamp_commit FILE...: JSON results that say "commit": "unknown" (the benchmark found no git) get $COMMIT.
stamp_commit() {
  local f
  for f in "$@"; do
    [[ -f $f ]] && grep -q '"commit": "unknown"' "$f" || continue
    sed -i "s/\"commit\": \"unknown\"/\"commit\": \"$COMMIT\"/" "$f" && say "$(basename "$f"): commit recorded as $COMMIT (from $COMMIT_FROM)"
  done
}

# -- prepare (here, before the lease) ----------------------------------------------------------------------------------
lock_pin() {  # NAME: its pin in requirements/lock-gpu.txt (NAME==VERSION), case and -/_ insensitive
  local want
  want=$(tr 'A-Z_' 'a-z-' <<<"$1")
  awk -F'==' -v w="$want" '{ n = tolower($1); gsub("_", "-", n); if (n == w) { print $1 "==" $2; exit } }' \
    "$REPO/requirements/lock-gpu.txt"
}
step_prepare() {  # [--no-wheels]: the commit stamp and the serving wheels into .gpu_session/carry
  local wheels=1 a
  for a in "$@"; do
    case "$a" in
      --no-wheels) wheels=0 ;;
      *) echo "prepare: unknown argument '$a' (--no-wheels)" >&2; exit 2 ;;
    esac
  done
  local c pins=() n p
  c=$(git_commit_here) || { echo "prepare: git does not work in $REPO: give MOELINK_COMMIT=<hash> in the device commands instead" >&2; exit 2; }
  for n in "${SERVE_WHEELS[@]}"; do
    p=$(lock_pin "$n")
    [[ -n $p ]] || { echo "prepare: $n has no pin in requirements/lock-gpu.txt" >&2; exit 2; }
    pins+=("$p")
  done
  local dl=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$CARRY/wheels" "${pins[@]}")
  if [[ $MODE == dry-run ]]; then
    echo "prepare: commit $c -> $CARRY/commit"
    [[ $wheels == 1 ]] && echo "prepare: ${dl[*]}"
    return 0
  fi
  mkdir -p "$CARRY"
  printf '%s\n' "$c" >"$CARRY/commit"
  say "commit $c -> .gpu_session/carry/commit$([[ $c == *-dirty ]] && echo ' (tracked files differ from HEAD: the device runs this working tree, commit first for a clean name)')"
  if [[ $wheels == 1 ]]; then
    rm -rf "$CARRY/wheels"
    mkdir -p "$CARRY/wheels"
    if timeout 300 "${dl[@]}"; then
      say "serving wheels ($(du -sh "$CARRY/wheels" | cut -f1)): $(cd "$CARRY/wheels" && ls | tr '\n' ' ')"
    else
      rm -rf "$CARRY/wheels"
      say "pip download failed (no registry here?): the e2e steps will run without their serving part"
    fi
  fi
  say "in every device call: carry [\".gpu_session/carry\"] ($(du -sh "$CARRY" | cut -f1))"
}

# -- serving imports (e2e --quick, e2e --serve) ------------------------------------------------------------------------
SERVE_OK=1
SERVE_WHY=""
serve_import_error() {  # prints the first import that fails (status 1), nothing when all import (status 0)
  "$PY" - "${SERVE_MODULES[@]}" <<'EOF' 2>&1
import importlib, sys
for m in sys.argv[1:]:
    try:
        importlib.import_module(m)
    except Exception as e:  # a missing module, or a protobuf/grpcio older than the stubs
        print(f"import {m}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        sys.exit(1)
EOF
}
# serve_deps: sets SERVE_OK (and SERVE_WHY); installs the carried serving wheels when an import fails.
serve_deps() {
  plan_only serve_deps 0 0 0 10 "the serving imports; the carried wheels (.gpu_session/carry/wheels) installed if one fails"
  [[ $MODE == dry-run ]] && return 0
  local why
  if why=$(serve_import_error); then
    SERVE_OK=1
    return 0
  fi
  if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
    say "serving imports fail ($why): installing the carried wheels into .gpu_session/site"
    if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
         --target "$STATE/site" "$CARRY"/wheels/*.whl >"$STATE/serve_wheels.log" 2>&1; then
      export PYTHONPATH="$STATE/site${PYTHONPATH:+:$PYTHONPATH}"
      if why=$(serve_import_error); then
        SERVE_OK=1
        say "serving imports: ok with the carried wheels"
        return 0
      fi
    else
      why="$why; pip install of the carried wheels failed: $(tail -n 1 "$STATE/serve_wheels.log")"
    fi
  else
    why="$why; no wheels carried (bash benchmarks/gpu_session.sh prepare, then carry .gpu_session/carry)"
  fi
  SERVE_OK=0
  SERVE_WHY=$why
  return 0
}
