"""Hardware profiles: one GPU's peaks plus the fabric its EP group runs on.

Peaks are datasheet dense (no sparsity) numbers. What a GPU really sustains
is lower and differs by generation, so each GPU also carries two *measured*
fractions: a large dense matmul's TFLOP/s over the datasheet, and a
device-to-device copy's bandwidth over the datasheet. Kernel efficiencies in
`efficiency.Efficiency` are fractions of these measured ceilings and are the
same for every GPU. Sources: REFERENCES.md (BF16/FP8, HBM, NVLink, H100/H200
measurements) except where a comment names another.
"""
from __future__ import annotations

from dataclasses import dataclass

from moelink.comm.link_model import IB_NDR400, NVLINK4, NVLINK5, NVLINK_H800, Fabric

DTYPES = ("bf16", "fp8", "nvfp4")


@dataclass(frozen=True)
class GpuSpec:
    """Peak dense tensor throughput per dtype (TFLOP/s), HBM capacity (GB) and bandwidth (TB/s).

    matmul_fraction: measured large-matmul TFLOP/s over the datasheet peak.
    copy_fraction: measured device-to-device copy bandwidth over the datasheet HBM bandwidth.
    """

    name: str
    tflops: dict
    hbm_gb: float
    hbm_tbps: float
    matmul_fraction: float
    copy_fraction: float

    def __post_init__(self) -> None:
        for dt in ("bf16", "fp8"):
            if self.tflops.get(dt, 0) <= 0:
                raise ValueError(f"GpuSpec {self.name}: tflops[{dt!r}] must be > 0.")
        if self.hbm_gb <= 0 or self.hbm_tbps <= 0:
            raise ValueError(f"GpuSpec {self.name}: hbm_gb and hbm_tbps must be > 0.")
        for name in ("matmul_fraction", "copy_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"GpuSpec {self.name}: {name}={getattr(self, name)} must be in (0, 1].")

    def peak_flops(self, dtype: str) -> float:
        """Datasheet FLOP/s of the tensor cores for `dtype`. Without FP4 units (Hopper), FP4 runs as FP8."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported: choose from {', '.join(DTYPES)}.")
        return self.tflops.get(dtype, self.tflops["fp8"]) * 1e12

    def ceiling_flops(self, dtype: str) -> float:
        """Measured-matmul ceiling for `dtype` (the same fraction of datasheet for every dtype)."""
        return self.peak_flops(dtype) * self.matmul_fraction

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_tbps * 1e12

    @property
    def ceiling_hbm_bytes_per_s(self) -> float:
        """Measured copy bandwidth."""
        return self.hbm_bytes_per_s * self.copy_fraction


# Hopper: 798 of 989 BF16 TFLOP/s on an 8192^3 matmul (0.81); copies at 3.0 of 3.35 TB/s (H100) and
# 4.3 of 4.8 (H200), 0.9 (REFERENCES.md).
HOPPER_MATMUL, HOPPER_COPY = 0.81, 0.9
# Blackwell: B200 sustains 1.56x H200's mixed-precision tensor throughput in microbenchmarks
# (Jarmusch & Chandrasekaran, arXiv 2512.02189), i.e. 1.56 * 798 = ~1,245 of 2,250 TFLOP/s (0.55);
# device-to-device copies run at just over 6 of 8 TB/s (newmind.ai B200 benchmark on TogetherAI, 0.75).
# GB200 is the same silicon at higher power; we give it the B200 fractions.
BLACKWELL_MATMUL, BLACKWELL_COPY = 0.55, 0.75

H100 = GpuSpec("H100-SXM", {"bf16": 989, "fp8": 1979}, 80, 3.35, HOPPER_MATMUL, HOPPER_COPY)
H200 = GpuSpec("H200", {"bf16": 989, "fp8": 1979}, 141, 4.8, HOPPER_MATMUL, HOPPER_COPY)
# H800: H100 compute and HBM, NVLink cut to 400 GB/s bidirectional (DeepSeek-V3 technical report).
H800 = GpuSpec("H800", {"bf16": 989, "fp8": 1979}, 80, 3.35, HOPPER_MATMUL, HOPPER_COPY)
# FP4 dense: half the sparse figures of NVIDIA's HGX B200 (18 PF sparse) and GB200 NVL72 (20 PF) datasheets.
B200 = GpuSpec("B200", {"bf16": 2250, "fp8": 4500, "nvfp4": 9000}, 180, 8.0, BLACKWELL_MATMUL, BLACKWELL_COPY)
GB200 = GpuSpec("GB200", {"bf16": 2500, "fp8": 5000, "nvfp4": 10000}, 186, 8.0, BLACKWELL_MATMUL, BLACKWELL_COPY)
# Blackwell Ultra: 15 PF dense NVFP4 per GPU (NVIDIA's "Inside Blackwell Ultra" blog) for GB300; HGX B300
# assumed 0.9 of it, as B200 is of GB200; BF16/FP8 as Blackwell; 288 GB HBM3e at 8 TB/s. Measured
# fractions: Blackwell's (no independent microbenchmark yet).
B300 = GpuSpec("B300", {"bf16": 2250, "fp8": 4500, "nvfp4": 13500}, 288, 8.0, BLACKWELL_MATMUL, BLACKWELL_COPY)
GB300 = GpuSpec("GB300", {"bf16": 2500, "fp8": 5000, "nvfp4": 15000}, 288, 8.0, BLACKWELL_MATMUL, BLACKWELL_COPY)

# Assumed rental prices, USD per GPU-hour (override with --gpu-hour-usd). Public reference points:
# DeepSeek's day-6 cost estimate uses $2 per H800-hour; LMSYS's Kimi K2 deployment prices H200 at $2.3.
# Blackwell figures are round assumptions in proportion to list-price ratios reported for cloud offers
# (B200 ~1.5x H200, GB200 a little above B200, Blackwell Ultra ~1.2x Blackwell); none is a quote.
GPU_HOUR_USD = {"H100-SXM": 2.0, "H200": 2.3, "H800": 2.0, "B200": 3.5, "GB200": 4.0, "B300": 4.2,
                "GB300": 4.8}


@dataclass(frozen=True)
class HardwareProfile:
    """A GPU, its NVLink domain and the NICs between domains (one 400 Gb/s NIC per GPU here).

    max_ep: the largest EP group we let the planner consider on this hardware.
    """

    name: str
    gpu: GpuSpec
    fabric: Fabric
    description: str
    max_ep: int = 256

    def __post_init__(self) -> None:
        if self.max_ep < 1:
            raise ValueError(f"HardwareProfile {self.name}: max_ep={self.max_ep} must be >= 1.")
        if self.gpu.name not in GPU_HOUR_USD:
            raise ValueError(f"HardwareProfile {self.name}: no assumed price for GPU {self.gpu.name!r} in GPU_HOUR_USD.")

    @property
    def gpu_hour_usd(self) -> float:
        """Assumed rental price of one GPU for one hour (see GPU_HOUR_USD)."""
        return GPU_HOUR_USD[self.gpu.name]


PROFILES = {
    p.name: p
    for p in (
        HardwareProfile("h100-hgx", H100, Fabric(NVLINK4, IB_NDR400, 8),
                        "8x H100 SXM per node, NVLink 4 (450 GB/s/dir), CX7 400 Gb/s IB per GPU"),
        HardwareProfile("h200-hgx", H200, Fabric(NVLINK4, IB_NDR400, 8),
                        "8x H200 per node, NVLink 4 (450 GB/s/dir), CX7 400 Gb/s IB per GPU"),
        HardwareProfile("h800-hgx", H800, Fabric(NVLINK_H800, IB_NDR400, 8),
                        "8x H800 per node, NVLink 200 GB/s/dir, CX7 400 Gb/s IB per GPU (DeepSeek's fleet)"),
        HardwareProfile("b200-hgx", B200, Fabric(NVLINK5, IB_NDR400, 8),
                        "8x B200 per node, NVLink 5 (900 GB/s/dir), CX7 400 Gb/s IB per GPU"),
        HardwareProfile("gb200-nvl72", GB200, Fabric(NVLINK5, IB_NDR400, 72),
                        "GB200 NVL72 rack: 72 GPUs in one NVLink 5 domain (900 GB/s/dir)", max_ep=72),
        HardwareProfile("b300-hgx", B300, Fabric(NVLINK5, IB_NDR400, 8),
                        "8x B300 per node, NVLink 5 (900 GB/s/dir), 400 Gb/s IB per GPU (CX8 runs 800: not assumed)"),
        HardwareProfile("gb300-nvl72", GB300, Fabric(NVLINK5, IB_NDR400, 72),
                        "GB300 NVL72 rack: 72 Blackwell Ultra GPUs in one NVLink 5 domain (900 GB/s/dir)", max_ep=72),
    )
}


def get_profile(name: str) -> HardwareProfile:
    """Profile by name; a ValueError lists the known names."""
    if name not in PROFILES:
        raise ValueError(f"hardware={name!r} is not known: choose from {', '.join(sorted(PROFILES))}.")
    return PROFILES[name]
