"""Launch configs of the expert GEMMs, as JSON data keyed by GPU name and shape (ARCHITECTURE.md: Design
rules 9).

Files in kernels/configs/:
- `E={E},N={N},device_name={GPU}.json` (written by benchmarks/tune_moe.py):
  {"key": "tokens", "configs": {"<tokens>": {...}, ...}}; the bucket nearest
  the batch's token count wins (vLLM's rule). N is the expert intermediate size I.
- `default.json`: GPUs with no tuned file, keyed by average rows per expert
  (tokens * top_k / E), the largest key not above wins: that ratio, not the
  token count, decides whether a block of rows fills up.
- `interpreter.json`: CPU tensors, i.e. the Triton interpreter (tests).

A config is {"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M",
"num_warps", "num_stages"} for the gate-up GEMM, with an optional "down" dict
overriding all but BLOCK_SIZE_M for the down GEMM (the alignment fixes one M block).
Optional "FUSED_GATE_UP": true makes the gate-up GEMM load one [BLOCK_K, 2*BLOCK_N]
tile (gate and up rows of w13 interleaved) and issue one dot of N = 2*BLOCK_N
instead of two of BLOCK_N (kernels/triton_moe.py); the down GEMM ignores it.
Optional "PERSISTENT": k (an integer >= 0, default 0 = off) launches min(tiles, k x #SMs) programs that loop over
the GEMM's tiles with a stride, reading the live row count from the device (the alignment's padded total), so
blocks past it cost nothing; 0 launches one program per tile of the host-side bound, as before.
Optional "TMA": true loads the weight tiles (and the down GEMM's sorted input rows) through Triton tensor
descriptors (TMA on Hopper) instead of pointer tiles. PERSISTENT and TMA apply to both GEMMs (the "down" dict
may override them). Shipped configs leave both off until a GPU measures them (benchmarks/tune_moe.py axes).
Optional "WARP_SPECIALIZE": true (with "TMA" only) compiles the bf16/fp16 down GEMM's K loop with Triton's
automatic warp specialization (`tl.range(..., warp_specialize=True)`, Triton >= 3.6, sm_90 and sm_100): a producer
warp group issues the TMA loads of h and w2 into a ring of shared-memory stages while the consumer warp groups run
the wgmmas, so loads and math overlap without the software pipeliner's register cost (with num_warps 4: 12
warps, a producer and two consumer groups; the sm_90 compile report shows 8-warp configs left as they are). The
gate-up GEMM (A rows gathered by pointer) and the FP8 loops (scales loaded by pointer) keep plain TMA: Triton 3.6's
pass asserts on a producer with pointer loads (checked offline for sm_90).
Optional "TINY": {"max_pairs", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps", "num_stages", "down": {...}}
turns on the tiny-batch path (kernels/triton_moe_tiny.py: no alignment, no sum pass, two launches) for
batches of at most max_pairs (token, expert) pairs; larger batches of the same bucket take the sorted path.
Optional "DEQUANT": true (MXFP4 and INT4 files only, kernels/triton_moe_mxfp4.py, triton_moe_int4.py): batches of this bucket that do not take
the tiny path dequantize every local expert once into a scratch of the activation dtype and run the float
sorted path on it (the bucket's blocks are then the float GEMMs'), instead of dequantizing per M tile.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"
_GEMM_KEYS = ("BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")
_FLAG_KEYS = ("FUSED_GATE_UP", "TMA", "WARP_SPECIALIZE")
_COUNT_KEYS = ("PERSISTENT",)  # non-negative integers, 0 = off


def _tile_ints(src: dict, fallback: dict, keys: tuple[str, ...], min_block: int, why: str, where: str) -> dict:
    """`keys` from src (else fallback), each a positive integer, with BLOCK_SIZE_N and BLOCK_SIZE_K powers of two
    >= min_block (`why` says what sets it): the checks a GEMM's and a tiny GEMV's blocks share."""
    vals = {k: src.get(k, fallback.get(k)) for k in keys}
    for k, v in vals.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{where}: {k}={v!r} is invalid: must be a positive integer.")
    for k in ("BLOCK_SIZE_N", "BLOCK_SIZE_K"):
        if vals[k] < min_block or vals[k] & (vals[k] - 1):
            raise ValueError(f"{where}: {k}={vals[k]} is invalid: must be a power of two >= {min_block}{why}.")
    return vals


@dataclass(frozen=True)
class GemmConfig:
    BLOCK_SIZE_N: int
    BLOCK_SIZE_K: int
    GROUP_SIZE_M: int
    num_warps: int
    num_stages: int
    FUSED_GATE_UP: bool = False  # gate-up GEMM only: one interleaved [BK, 2*BN] tile and one dot
    PERSISTENT: int = 0  # programs per SM of the persistent tile loop; 0: one program per tile (no loop)
    TMA: bool = False  # weight tiles (and the down GEMM's sorted rows) through tensor descriptors
    WARP_SPECIALIZE: bool = False  # with TMA: the K loop split into producer (TMA) and consumer (MMA) warp groups

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in _FLAG_KEYS + _COUNT_KEYS:  # written only when set, so files without the keys stay as they were
            if not d[k]:
                del d[k]
        return d


@dataclass(frozen=True)
class TinyGemm:
    """One GEMV kernel of the tiny path: a program reduces BLOCK_SIZE_N weight rows over BLOCK_SIZE_K columns."""

    BLOCK_SIZE_N: int
    BLOCK_SIZE_K: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class TinyConfig:
    """The tiny-batch path and when it runs: pair count T*K <= max_pairs (a host-known shape, graph-safe).

    The down kernel's BLOCK_SIZE_N is the widest it uses: the wrapper narrows it (to 8 at least) until the
    grid gives every SM two programs (one token's output is only D / BLOCK_SIZE_N programs)."""

    max_pairs: int
    up: TinyGemm
    down: TinyGemm

    @classmethod
    def from_dict(cls, d: dict, where: str = "TINY") -> "TinyConfig":
        if not isinstance(d, dict):
            raise ValueError(f"{where}={d!r} is invalid: must be an object with max_pairs and the GEMV blocks.")
        mp = d.get("max_pairs")
        if not isinstance(mp, int) or isinstance(mp, bool) or mp < 0:
            raise ValueError(f"{where}: max_pairs={mp!r} is invalid: must be an integer >= 0 (0 turns the path off).")

        def gemv(src: dict, fallback: dict) -> TinyGemm:
            vals = _tile_ints(src, fallback, _TINY_KEYS, 1, "", where)
            if vals["BLOCK_SIZE_K"] < 8:  # (a row of BLOCK_N may be one: the float GEMVs take few rows, whole tiles wide)
                raise ValueError(f"{where}: BLOCK_SIZE_K={vals['BLOCK_SIZE_K']} is invalid: must be a power of two >= 8.")
            return TinyGemm(**vals)

        up = gemv(d, {})
        return cls(mp, up, gemv(d.get("down", {}), asdict(up)))

    def to_dict(self) -> dict:
        d = {"max_pairs": self.max_pairs, **asdict(self.up)}
        if self.down != self.up:
            d["down"] = asdict(self.down)
        return d


_TINY_KEYS = ("BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps", "num_stages")
# What `path="tiny"` runs with when the picked config has no TINY entry (benchmarks, tests).
# The down GEMV's tile is [K, BN, BK] (all of a token's pairs at once): BN * BK = 1024 keeps 8 pairs of it at
# 64 bf16 values a thread (4 warps), the same bytes in flight as the gate-up GEMV's two [16, 256] tiles.
DEFAULT_TINY = TinyConfig(64, TinyGemm(16, 256, 4, 2), TinyGemm(8, 128, 4, 2))
# The float path's (kernels/triton_moe_tiny.py's unrolled GEMVs), from the sm_90 compile report's loads in flight
# (benchmarks/results/compile_report_tiny_sm90.md): gate-up 2 rows x 1024 columns a tile at 4 warps (warps along K,
# so x's row shares the weight tile's layout: no conversion; 56 registers, ~18 KB in flight a program, 9 programs
# an SM); down 2 rows x 256 at one warp (no barrier at all; ~7 KB in flight, 19 programs an SM), narrowed to 1 row
# where one token's grid is short of GEMV_WARPS_PER_SM.
DEFAULT_TINY_FLOAT = TinyConfig(64, TinyGemm(2, 1024, 4, 1), TinyGemm(2, 256, 1, 1))


@dataclass(frozen=True)
class MoELaunchConfig:
    """One fused-MoE launch: the up and down GEMMs' tiles (and the tiny-batch path's). Named apart from the model's
    MoE layer config (engine/models/blocks/ffn_config.MoEConfig). BLOCK_SIZE_M is shared: the token alignment pads every
    expert's rows to it."""

    BLOCK_SIZE_M: int
    up: GemmConfig
    down: GemmConfig
    tiny: TinyConfig | None = None  # the tiny-batch path, for pair counts up to tiny.max_pairs
    dequant: bool = False  # MXFP4, INT4: dequantize the experts once per call, then the float sorted path

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "MoELaunchConfig":
        def gemm(src: dict, fallback: dict) -> GemmConfig:
            vals = _tile_ints(src, fallback, _GEMM_KEYS, 16, " (tl.dot tiles)", where)
            for k in _FLAG_KEYS:
                v = src.get(k, fallback.get(k, False))
                if not isinstance(v, bool):
                    raise ValueError(f"{where}: {k}={v!r} is invalid: must be true or false.")
                vals[k] = v
            for k in _COUNT_KEYS:
                v = src.get(k, fallback.get(k, 0))
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise ValueError(f"{where}: {k}={v!r} is invalid: must be an integer >= 0 (0 turns it off).")
                vals[k] = v
            if vals["WARP_SPECIALIZE"] and not vals["TMA"]:
                raise ValueError(f"{where}: WARP_SPECIALIZE=true is invalid without TMA=true: the producer warp group "
                                 "issues tensor-descriptor (TMA) loads.")
            return GemmConfig(**vals)

        bm = d.get("BLOCK_SIZE_M")
        if not isinstance(bm, int) or bm < 16 or bm & (bm - 1):
            raise ValueError(f"{where}: BLOCK_SIZE_M={bm!r} is invalid: must be a power of two >= 16.")
        up = gemm(d, {})
        tiny = TinyConfig.from_dict(d["TINY"], f"{where}: TINY") if "TINY" in d else None
        dequant = d.get("DEQUANT", False)
        if not isinstance(dequant, bool):
            raise ValueError(f"{where}: DEQUANT={dequant!r} is invalid: must be true or false.")
        return cls(bm, up, replace(gemm(d.get("down", {}), asdict(up)), FUSED_GATE_UP=False), tiny,  # (up GEMM only)
                   dequant)

    def to_dict(self) -> dict:
        d = {"BLOCK_SIZE_M": self.BLOCK_SIZE_M, **self.up.to_dict()}
        if self.down != replace(self.up, FUSED_GATE_UP=False):
            d["down"] = self.down.to_dict()
            for k in ("TMA", "WARP_SPECIALIZE") + _COUNT_KEYS:  # (a default dropped from down's dict would inherit up's)
                if getattr(self.down, k) != getattr(self.up, k):
                    d["down"][k] = getattr(self.down, k)
        if self.tiny is not None:
            d["TINY"] = self.tiny.to_dict()
        if self.dequant:
            d["DEQUANT"] = True
        return d

    def uses_tiny(self, num_pairs: int) -> bool:
        """Whether a batch of `num_pairs` (token, expert) pairs takes the tiny path under this config."""
        return self.tiny is not None and 0 < num_pairs <= self.tiny.max_pairs


def device_name(device: torch.device) -> str:
    """File-name form of the GPU's name ('NVIDIA_H100_80GB_HBM3'); 'cpu' for the interpreter."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index).replace(" ", "_")


def config_file_name(num_experts: int, inter: int, name: str) -> str:
    return f"E={num_experts},N={inter},device_name={name}.json"


# (key kind, sorted ((bucket, config), ...)): a config file as read, what `_pick` picks from.
ConfigTable = tuple[str, tuple[tuple[int, MoELaunchConfig], ...]]


@functools.lru_cache(maxsize=64)
def load_config_file(path: str) -> ConfigTable | None:
    """(key kind, sorted ((bucket, config), ...)) or None when the file does not exist."""
    p = Path(path)
    if not p.is_file():
        return None
    data = json.loads(p.read_text())
    key = data.get("key", "tokens")
    if key not in ("tokens", "rows_per_expert"):
        raise ValueError(f"{p.name}: key={key!r} is invalid: must be 'tokens' or 'rows_per_expert'.")
    buckets = tuple(sorted((int(b), MoELaunchConfig.from_dict(c, f"{p.name}[{b}]")) for b, c in data["configs"].items()))
    if not buckets:
        raise ValueError(f"{p.name}: configs is empty: give at least one bucket.")
    return key, buckets


def committed_config(name: str) -> ConfigTable:
    """One of the config files committed in kernels/configs/ (package data: always there)."""
    found = load_config_file(str(CONFIG_DIR / name))
    if found is None:
        raise FileNotFoundError(f"{CONFIG_DIR / name}: a committed MoE config file is missing from the install")
    return found


def _pick(key: str, buckets, num_tokens: int, top_k: int, num_experts: int) -> MoELaunchConfig:
    if key == "tokens":
        return min(buckets, key=lambda bc: (abs(bc[0] - num_tokens), bc[0]))[1]
    rows = num_tokens * top_k / max(1, num_experts)
    best = buckets[0][1]
    for bucket, cfg in buckets:
        if bucket <= rows:
            best = cfg
    return best


def get_moe_config(num_experts: int, inter: int, num_tokens: int, top_k: int, device: torch.device,
                   config_dir: str | Path | None = None) -> MoELaunchConfig:
    """The launch config for this shape on this device: tuned file, else defaults."""
    return lookup_moe_config(num_experts, inter, num_tokens, top_k, device_name(device), config_dir)


def lookup_moe_config(num_experts: int, inter: int, num_tokens: int, top_k: int, name: str,
                      config_dir: str | Path | None = None) -> MoELaunchConfig:
    """`get_moe_config` for a GPU named by `device_name` ('cpu': the interpreter), no device needed: what
    start-up warm-up plans with (kernels/moe_variants.py)."""
    key, buckets = config_table(num_experts, inter, name, config_dir)
    return _pick(key, buckets, num_tokens, top_k, num_experts)


def config_table(num_experts: int, inter: int, name: str, config_dir: str | Path | None = None) -> ConfigTable:
    """(key kind, sorted buckets) of the file a shape's launch configs come from on GPU `name`."""
    root = Path(config_dir) if config_dir is not None else CONFIG_DIR
    if name == "cpu":
        return load_config_file(str(root / "interpreter.json")) or committed_config("interpreter.json")
    found = load_config_file(str(root / config_file_name(num_experts, inter, name)))
    if found is None:
        found = load_config_file(str(root / "default.json")) or committed_config("default.json")
    return found


def format_config_table(fmt: str, tuned: str, name: str, config_dir: str | Path | None = None) -> ConfigTable:
    """(key kind, sorted buckets) of a weight format's launch configs (FP8's, INT4's, MXFP4's: files of their own) on
    GPU `name`: its tuned file named `tuned` in config_dir (kernels/configs/ by default), else the committed
    `{fmt}_moe_default.json`; `{fmt}_moe_interpreter.json` on CPU ('cpu')."""
    root = Path(config_dir) if config_dir is not None else CONFIG_DIR
    if name == "cpu":
        return committed_config(f"{fmt}_moe_interpreter.json")
    return load_config_file(str(root / tuned)) or committed_config(f"{fmt}_moe_default.json")


def default_config(num_experts: int, inter: int, num_tokens: int, top_k: int) -> MoELaunchConfig:
    """The config a GPU with no tuned file for this shape gets (default.json): tune_moe's first seed."""
    key, buckets = committed_config("default.json")
    return _pick(key, buckets, num_tokens, top_k, num_experts)


def tuned_file_name_ok(name: str) -> bool:
    """A tuned config file name as get_moe_config looks it up, `E=<int>,N=<int>,device_name=<GPU>.json`, or as
    triton_moe_fp8.get_fp8_moe_config / triton_moe_mxfp4's table / the batch-invariant MoE
    (kernels/batch_invariant_triton.py) do, the same with a `fp8_w8a8,` / `mxfp4,` / `batch_invariant,` prefix; no
    path."""
    import re

    return re.fullmatch(r"(fp8_w8a8,|mxfp4,|batch_invariant,)?E=\d+,N=\d+,device_name=[A-Za-z0-9._-]+\.json",
                        name) is not None


def write_config_file(path: str | Path, configs: dict[int, MoELaunchConfig], meta: dict | None = None) -> None:
    """Token-keyed file as tune_moe.py writes it: one bucket per line, so diffs stay readable."""
    lines = [f'    "{b}": {json.dumps(c.to_dict())}' for b, c in sorted(configs.items())]
    head = {"key": "tokens", **(meta or {})}
    head_txt = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in head.items())
    Path(path).write_text("{\n" + head_txt + ',\n  "configs": {\n' + ",\n".join(lines) + "\n  }\n}\n")
    load_config_file.cache_clear()
