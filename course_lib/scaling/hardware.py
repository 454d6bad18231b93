"""Accelerators as data: every figure a cost model reads, each with the public document it was read from.

A cost model is only as good as the numbers it is fed, so here a number never travels without its source.
``Hardware`` holds the figures of one GPU as a serving system sees it (its memory, its tensor-core rates,
its links to the other GPUs) and, beside them, where each came from (``sources``) or why it is missing
(``missing``). The constructor refuses a figure without a source and a gap without a reason.

Two kinds of entry:

* **datasheet** (``Hardware.datasheet("h100-sxm")``): NVIDIA's published peaks. Tensor-core rates are
  **dense**: NVIDIA's tables print the 2:4-sparse rate first (footnoted "with sparsity"), which is twice the
  dense one; a transformer's weights are not 2:4-sparse, so the catalogue halves those figures and says so.
* **measured** (``Hardware.measured("h100-sxm")``): what this course measured on its own H100 (the results
  files in ``course_lib/results/``): copy bandwidth, the cuBLAS bf16 rate, the fp32 rate, the memory the
  driver reports. Figures the course has not measured (fp8, fp4, NVLink, the network) stay the datasheet's,
  with the datasheet's source, so every figure still says where it came from.

Values are stored in bytes, bytes per second and floating-point operations per second (a multiply-add is
two). Rates are SI, as datasheets print them: ``GB/s`` is 1e9 bytes a second. Memory capacities are not: a
datasheet's "80GB" of HBM is 80 GiB (80 * 2**30 bytes), as the course's own H100 shows, whose driver reports
85.0e9 bytes (engine.json's ``memory_bytes``), so the catalogue stores capacities as ``GIB`` multiples and
lists them in GiB. NVLink is quoted as datasheets quote it, both directions
summed; ``nvlink_bytes_per_s_each_way`` is half of it, what one direction of a ring carries. A network card
(NIC) is quoted per direction, as its line rate is (400 Gb/s = 50 GB/s each way).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from course_lib.bench.results import RESULTS_DIR, load_result

GB, TB, TFLOPS, PFLOPS = 1e9, 1e12, 1e12, 1e15
GIB = 2**30  # a datasheet's "GB" of memory capacity
GBIT = 1e9 / 8  # bytes per second in one gigabit per second
READ = "2026-12-07"  # the day the public figures below were read

# The figures a Hardware carries, with their units (for listings).
FIGURES = {
    "hbm_bytes": "GiB",
    "hbm_bytes_per_s": "GB/s",
    "bf16_flops_per_s": "TFLOP/s",
    "fp8_flops_per_s": "TFLOP/s",
    "fp4_flops_per_s": "TFLOP/s",
    "fp32_flops_per_s": "TFLOP/s",
    "nvlink_bytes_per_s": "GB/s",
    "nvlink_domain": "GPUs",
    "nic_bytes_per_s": "GB/s",
}
SCALE = {"GiB": GIB, "GB/s": GB, "TFLOP/s": TFLOPS, "GPUs": 1}
SI_UNIT = {"GiB": "bytes", "GB/s": "bytes/s", "TFLOP/s": "FLOP/s", "GPUs": "GPUs"}
# What each figure the course measures is, for listings: the copy counts the bytes read and written.
MEASURED_LABELS = {"hbm_bytes_per_s": "copy, read+write", "bf16_flops_per_s": "cuBLAS 8192^3",
                   "fp32_flops_per_s": "SGEMM 8192^3", "hbm_bytes": "driver"}
# The element types a cost model may ask a rate for, and the figure that holds it.
RATE_FIELDS = {"bfloat16": "bf16_flops_per_s", "float8": "fp8_flops_per_s", "float4": "fp4_flops_per_s",
               "float32": "fp32_flops_per_s"}


@dataclass(frozen=True)
class Source:
    """Where one figure comes from: what was read, its address (or results file), the date, how it was used."""

    title: str
    url: str
    read: str
    note: str = ""

    def line(self) -> str:
        """One line for a listing: title, address, date, note."""
        note = f"; {self.note}" if self.note else ""
        return f"{self.title} <{self.url}> (read {self.read}{note})"


@dataclass(frozen=True)
class Hardware:
    """One GPU's figures, as a serving system sees them, each with its source (or the reason it is missing).

    ``nvlink_domain`` is how many GPUs one NVLink fabric joins (8 on an HGX board, 72 in an NVL72 rack):
    tensor parallelism lives inside it, anything wider crosses the network at ``nic_bytes_per_s``.
    """

    key: str
    name: str
    origin: str  # "datasheet" or "measured"
    hbm_bytes: float | None
    hbm_bytes_per_s: float | None
    bf16_flops_per_s: float | None  # dense tensor-core rate
    fp8_flops_per_s: float | None  # dense tensor-core rate
    fp4_flops_per_s: float | None  # dense tensor-core rate
    fp32_flops_per_s: float | None  # CUDA cores, no tensor cores
    nvlink_bytes_per_s: float | None  # per GPU, both directions summed
    nvlink_domain: int | None
    nic_bytes_per_s: float | None  # per GPU, each direction
    sources: Mapping[str, Source] = field(default_factory=dict, hash=False)  # dicts: compared, never hashed
    missing: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.origin not in ("datasheet", "measured"):
            raise ValueError(f"origin must be 'datasheet' or 'measured', got {self.origin!r}")
        for name in FIGURES:
            value = getattr(self, name)
            if value is None and not self.missing.get(name):
                raise ValueError(f"{self.key}: {name} is None; say why in `missing` (never leave a silent gap)")
            if value is not None:
                if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                    raise ValueError(f"{self.key}: {name} must be a finite number > 0 or None, got {value!r}")
                if name not in self.sources:
                    raise ValueError(f"{self.key}: {name}={value} has no source; every figure carries one")
                if name in self.missing:
                    raise ValueError(f"{self.key}: {name} has a value and a reason for being missing")
        unknown = (set(self.sources) | set(self.missing)) - set(FIGURES)
        if unknown:
            raise ValueError(f"{self.key}: sources or missing name unknown figures {sorted(unknown)}")

    @classmethod
    def datasheet(cls, key: str) -> Hardware:
        """The catalogue's entry ``key`` (``list_keys()`` names them), NVIDIA's published figures."""
        if key not in CATALOGUE:
            raise ValueError(f"unknown GPU {key!r}; the catalogue has {', '.join(CATALOGUE)}")
        return CATALOGUE[key]

    @classmethod
    def measured(cls, key: str) -> Hardware:
        """``key``'s datasheet entry with the figures this course measured on that GPU put in their place."""
        if key not in MEASURED_CARDS:
            raise ValueError(f"the course has measured no {key!r}; it has results for {', '.join(MEASURED_CARDS)}")
        return measured_entry(key, MEASURED_CARDS[key])

    @property
    def nvlink_bytes_per_s_each_way(self) -> float:
        """What one direction of one GPU's NVLink carries: half the datasheet's both-ways figure."""
        return self.require("nvlink_bytes_per_s") / 2

    def require(self, name: str) -> float:
        """Figure ``name``, or a ValueError that says why this entry has none (a model cannot guess it)."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{self.name} ({self.origin}) has no {name}: {self.missing[name]}")
        return value

    def flops_per_s(self, dtype: str) -> float:
        """The dense rate for ``dtype`` ('bfloat16', 'float8', 'float4' on tensor cores; 'float32' on CUDA cores)."""
        if dtype not in RATE_FIELDS:
            raise ValueError(f"no rate for element type {dtype!r}; known: {', '.join(RATE_FIELDS)}")
        return self.require(RATE_FIELDS[dtype])

    def describe(self) -> list[str]:
        """One line per figure (value, unit, [n] its source, or why it is missing), then the numbered sources."""
        lines, numbers = [f"{self.key}: {self.name} ({self.origin})"], {}
        for name, unit in FIGURES.items():
            value = getattr(self, name)
            if value is None:
                lines.append(f"  {name:<20} {'-':>10}          missing: {self.missing[name]}")
            else:
                number = numbers.setdefault(self.sources[name], len(numbers) + 1)
                label = f" ({MEASURED_LABELS[name]})" if self.origin == "measured" and name in MEASURED_LABELS else ""
                lines.append(f"  {name:<20} {value / SCALE[unit]:>10,.6g} {unit:<8} [{number}]{label}")
        lines.extend(f"  [{number}] {source.line()}" for source, number in numbers.items())
        return lines

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: each figure with its unit and source or reason."""
        out: dict[str, Any] = {"key": self.key, "name": self.name, "origin": self.origin, "figures": {}}
        for name, unit in FIGURES.items():
            value = getattr(self, name)
            entry: dict[str, Any] = {"value": value, "unit": SI_UNIT[unit]}
            if value is None:
                entry["missing"] = self.missing[name]
            else:
                entry["source"] = vars(self.sources[name])
            out["figures"][name] = entry
        return out


# ---- the public documents the catalogue was read from -----------------------------------------------------

H100_TABLE = Source(
    "NVIDIA H100 Tensor Core GPU specifications table (H100 SXM column), reproduced by HPC Tech; footnote "
    "'* Shown with sparsity. Specifications 1/2 lower without sparsity.'",
    "https://archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html", READ)
H200_PAGE = Source(
    "NVIDIA H200 specifications quoted from NVIDIA's H200 page by Morph: 'the SXM form factor delivers 3,958 "
    "TFLOPS of FP8 Tensor Core performance with sparsity and 1,979 TFLOPS each of FP16 and BFLOAT16 with "
    "sparsity', '141GB of HBM3e running at 4.8TB/s'", "https://www.morphllm.com/nvidia-h200", READ)
H200_MLPERF = Source(
    "MLCommons Inference v4.1, NVIDIA's H200-SXM-141GBx8 system description: 'accelerator_interconnect': "
    "'18x 4th Gen NVLink, 900GB/s'",
    "https://raw.githubusercontent.com/mlcommons/inference_results_v4.1/main/closed/NVIDIA/systems/"
    "H200-SXM-141GBx8_TRT_MaxQ.json", READ)
HGX_RA = Source(
    "NVIDIA HGX AI Factory (H100, H200, B200) reference architecture, abstract: HGX servers 'featuring eight "
    "GPUs per node', a '2-8-9-400 infrastructure configuration (2 CPUs, 8 GPUs, 9 NICs at 400 Gb/s bandwidth "
    "per GPU)'", "https://docs.nvidia.com/reference-architectures/hgx-ai-factory-h100-h200-b200/abstract.md", READ)
B200_NOTES = Source(
    "Glenn K. Lockwood, 'B200' notes: 'HGX variant of B200 ... configured at 1,000 W' and 'GB200 variant of "
    "B200 when configured to 1,200 W' tables of VFMA / Matrix / Sparse TFLOPS; '8 TB/s (max)'; '2x 900 GB/s "
    "NVLink 5'", "https://glennklockwood.com/garden/processors/B200", READ)
B200_MLPERF = Source(
    "MLCommons Inference v6.0, Nebius HGX B200 system description: 'NVIDIA B200-SXM-180GB', '18x 5th Gen "
    "NVLink, 14.4 TB/s aggregated bandwidth' (8 GPUs), '8x ConnectX-7 IB NDR 400Gb/s'",
    "https://raw.githubusercontent.com/mlcommons/inference_results_v6.0/main/closed/Nebius/systems/"
    "nebius_b200_n1.json", READ)
GB200_MLPERF = Source(
    "MLCommons Inference v6.1, Crusoe GB200 NVL72 system description: 'accelerator_memory_capacity': '186 GB'",
    "https://raw.githubusercontent.com/mlcommons/inference_results_v6.1/main/closed/Crusoe/systems/"
    "GB200-NVL72_GB200-186GB_aarch64x16_Dynamo.json", READ)
GB200_WIKI = Source(
    "AI Wiki, 'NVIDIA GB200 NVL72': '72 Blackwell GPUs ... joined into one NVLink domain', 'NVLink continuous "
    "across the whole rack at 1.8 TB/s per GPU'", "https://aiwiki.ai/wiki/nvidia_gb200_nvl72/raw", READ)
GB300_BLOG = Source(
    "Verda (formerly DataCrunch), 'NVIDIA GB300 NVL72: GPU Architecture & Performance', per-GPU table "
    "'Performance numbers without sparsity': GB300 FP4 15 PFLOPS, FP8 5, FP16/BF16 2.5, FP32 0.080, memory "
    "bandwidth 8 TB/s; '1.8 TB/s total bandwidth (900 GB/s unidirectional)'; 72 GPUs per NVLink domain",
    "https://verda.com/blog/gb300-nvl72-architecture", READ)
B300_NOTES = Source(
    "Glenn K. Lockwood, 'B300' notes: each GPU '288 GB HBM3e'; GB300 NVL72 has '72 ConnectX-8 NICs'",
    "https://glennklockwood.com/garden/processors/B300", READ)
B300_RA = Source(
    "NVIDIA HGX AI Factory reference architecture (HGX B300), abstract: '9 NICs at 800 Gb/s bandwidth per GPU' "
    "on 'NVIDIA ConnectX-8 SuperNICs'", "https://docs.nvidia.com/reference-architectures/hgx-ai-factory/abstract.md",
    READ, "ConnectX-8, one per GPU as in the GB300 NVL72 (B300 notes), runs at 800 Gb/s")
NO_FP4_ON_HOPPER = ("Hopper has no FP4 tensor cores: NVIDIA Transformer Engine's support matrix lists NVFP4 as "
                    "'No' for compute capability 9.0 <https://nvidia.github.io/TransformerEngine/support_matrix.html> "
                    f"(read {READ})")


def _halved(source: Source) -> Source:
    """``source`` for a rate printed 'with sparsity': the dense rate is half of it."""
    return replace(source, note="dense rate: the table's sparse figure halved")


def _gib(source: Source) -> Source:
    """``source`` for a memory capacity: its "GB" read as GiB (2**30 bytes), as GPU memory is sized."""
    return replace(source, note="memory 'GB' read as GiB: the 80GB H100 reports 85.0e9 bytes to its driver")


def _entry(key: str, name: str, figures: dict[str, tuple[float | None, Source | str]]) -> Hardware:
    """A datasheet Hardware from ``{figure: (value, source)}``, or ``(None, reason it is missing)``."""
    values = {figure: value for figure, (value, _) in figures.items()}
    sources = {figure: why for figure, (value, why) in figures.items() if value is not None}
    missing = {figure: why for figure, (value, why) in figures.items() if value is None}
    return Hardware(key, name, "datasheet", **values, sources=sources, missing=missing)


CATALOGUE: dict[str, Hardware] = {entry.key: entry for entry in (
    _entry("h100-sxm", "NVIDIA H100 SXM 80GB", {
        "hbm_bytes": (80 * GIB, _gib(H100_TABLE)),
        "hbm_bytes_per_s": (3350 * GB, H100_TABLE),
        "bf16_flops_per_s": (1979 / 2 * TFLOPS, _halved(H100_TABLE)),
        "fp8_flops_per_s": (3958 / 2 * TFLOPS, _halved(H100_TABLE)),
        "fp4_flops_per_s": (None, NO_FP4_ON_HOPPER),
        "fp32_flops_per_s": (67 * TFLOPS, H100_TABLE),
        "nvlink_bytes_per_s": (900 * GB, H100_TABLE),
        "nvlink_domain": (8, HGX_RA),
        "nic_bytes_per_s": (400 * GBIT, HGX_RA),
    }),
    _entry("h200", "NVIDIA H200 SXM 141GB", {
        "hbm_bytes": (141 * GIB, _gib(H200_PAGE)),
        "hbm_bytes_per_s": (4800 * GB, H200_PAGE),
        "bf16_flops_per_s": (1979 / 2 * TFLOPS, _halved(H200_PAGE)),
        "fp8_flops_per_s": (3958 / 2 * TFLOPS, _halved(H200_PAGE)),
        "fp4_flops_per_s": (None, NO_FP4_ON_HOPPER),
        "fp32_flops_per_s": (None, "no H200 fp32 (CUDA-core) figure in the sources read; the catalogue does not "
                                   "copy H100's across products"),
        "nvlink_bytes_per_s": (900 * GB, H200_MLPERF),
        "nvlink_domain": (8, HGX_RA),
        "nic_bytes_per_s": (400 * GBIT, HGX_RA),
    }),
    _entry("b200", "NVIDIA B200 (HGX B200, 1,000 W)", {
        "hbm_bytes": (180 * GIB, _gib(B200_MLPERF)),
        "hbm_bytes_per_s": (8 * TB, B200_NOTES),
        "bf16_flops_per_s": (2250 * TFLOPS, B200_NOTES),
        "fp8_flops_per_s": (4500 * TFLOPS, B200_NOTES),
        "fp4_flops_per_s": (9000 * TFLOPS, B200_NOTES),
        "fp32_flops_per_s": (80 * TFLOPS, B200_NOTES),
        "nvlink_bytes_per_s": (1800 * GB, B200_MLPERF),
        "nvlink_domain": (8, HGX_RA),
        "nic_bytes_per_s": (400 * GBIT, HGX_RA),
    }),
    _entry("gb200-nvl72", "NVIDIA GB200 NVL72 (one of its 72 B200 GPUs, 1,200 W)", {
        "hbm_bytes": (186 * GIB, _gib(GB200_MLPERF)),
        "hbm_bytes_per_s": (8 * TB, B200_NOTES),
        "bf16_flops_per_s": (2500 * TFLOPS, B200_NOTES),
        "fp8_flops_per_s": (5000 * TFLOPS, B200_NOTES),
        "fp4_flops_per_s": (10000 * TFLOPS, B200_NOTES),
        "fp32_flops_per_s": (90 * TFLOPS, B200_NOTES),
        "nvlink_bytes_per_s": (1800 * GB, GB200_WIKI),
        "nvlink_domain": (72, GB200_WIKI),
        "nic_bytes_per_s": (None, "no per-GPU network figure in the sources read: the GB200 NVL72 system "
                                  "description read (MLCommons v6.1, Crusoe) names ConnectX-7 NICs but no speed"),
    }),
    _entry("gb300-nvl72", "NVIDIA GB300 NVL72 (one of its 72 Blackwell Ultra GPUs)", {
        "hbm_bytes": (288 * GIB, _gib(B300_NOTES)),
        "hbm_bytes_per_s": (8 * TB, GB300_BLOG),
        "bf16_flops_per_s": (2.5 * PFLOPS, GB300_BLOG),
        "fp8_flops_per_s": (5 * PFLOPS, GB300_BLOG),
        "fp4_flops_per_s": (15 * PFLOPS, GB300_BLOG),
        "fp32_flops_per_s": (80 * TFLOPS, GB300_BLOG),
        "nvlink_bytes_per_s": (1800 * GB, GB300_BLOG),
        "nvlink_domain": (72, GB300_BLOG),
        "nic_bytes_per_s": (800 * GBIT, B300_RA),
    }),
)}


# ---- what the course measured -------------------------------------------------------------------------------

MEASURED_CARDS = {"h100-sxm": "nvidia-h100-80gb-hbm3"}  # catalogue key -> results folder of the same GPU


def measured_entry(key: str, card: str) -> Hardware:
    """The datasheet entry ``key`` with the figures measured on ``card`` (a results folder) in their place.

    * ``hbm_bytes_per_s``: engine.json's ``copy`` (1 GiB device to device, bytes read + written), the copy the
      engine suite measures its decode roofline against: about the bytes a decode step streams.
    * ``bf16_flops_per_s``: gemm.json's ``cublas_tflops_8192`` (cuBLAS, bf16, 8192^3).
    * ``fp32_flops_per_s``: env.json's ``matmul_fp32_tflops`` (cuBLAS SGEMM 8192^3: CUDA cores, no tensor cores).
    * ``hbm_bytes``: the memory the driver reports (engine.json's device facts).

    The course has no NCCL results file yet, so NVLink and the network keep their datasheet figures and
    sources; fp8 and fp4 too (nothing here measures them).
    """
    base = Hardware.datasheet(key)
    engine, gemm, env = (load_result(name, card) for name in ("engine", "gemm", "env"))
    copy = next((m for m in engine["measurements"] if m["label"] == "copy"), None)
    if copy is None:
        raise ValueError(f"{card}/engine.json has no 'copy' measurement to read the memory bandwidth from")
    measured = {
        "hbm_bytes_per_s": (copy["derived"]["gbps"] * GB, _result_source(
            engine, card, "measurement 'copy': cudaMemcpyAsync of 1 GiB device to device in a CUDA graph, bytes read "
            "+ written")),
        "bf16_flops_per_s": (gemm["headline"]["cublas_tflops_8192"] * TFLOPS, _result_source(
            gemm, card, "headline cublas_tflops_8192: cuBLAS bf16 GEMM, 8192^3")),
        "fp32_flops_per_s": (env["headline"]["matmul_fp32_tflops"] * TFLOPS, _result_source(
            env, card, "headline matmul_fp32_tflops: cuBLAS SGEMM 8192^3 (CUDA cores)")),
        "hbm_bytes": (float(engine["device"]["memory_bytes"]), _result_source(
            engine, card, "device memory_bytes: the memory the driver reports")),
    }
    values = {name: value for name, (value, _) in measured.items()}
    sources = {**base.sources, **{name: source for name, (_, source) in measured.items()}}
    return replace(base, name=f"{base.name}, measured by the course", origin="measured", **values, sources=sources)


def _result_source(result: dict[str, Any], card: str, what: str) -> Source:
    path = (RESULTS_DIR / card / f"{result['name']}.json").relative_to(RESULTS_DIR.parent.parent)
    return Source(f"course measurement on {result['card']}: {what}", str(path), result["date"][:10])


def list_keys() -> list[str]:
    """The catalogue's GPU names, as ``--gpu`` takes them."""
    return list(CATALOGUE)


def hardware(key: str, measured: bool = False) -> Hardware:
    """``key``'s datasheet entry, or with ``measured`` the course's measured one."""
    return Hardware.measured(key) if measured else Hardware.datasheet(key)


def all_entries() -> list[Hardware]:
    """Every datasheet entry, then every measured one (for listings)."""
    return [*CATALOGUE.values(), *(Hardware.measured(key) for key in MEASURED_CARDS)]

