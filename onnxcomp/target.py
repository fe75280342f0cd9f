"""The machine a model is compressed for: its instruction sets and the integer layout it needs.

A model is compressed on one machine and deployed on another, so quantisation passes never
look at the host: they read a :class:`Target` handed down by the pipeline (like ``--data``).
The host is probed once, at the edge (``--target host``, ``onnxcomp doctor``), from the OS's
CPU description; tests hand passes any :class:`CpuInfo` they like.

Why the layout depends on the target: ONNX Runtime's u8·s8 integer GEMM/conv kernels on x86
CPUs with AVX2 but without VNNI (many AMD EPYC, Xeons before Cascade Lake) multiply with
``vpmaddubsw``, which adds pairs of u8×s8 products in a signed 16-bit lane and saturates:
255·127·2 = 64770 > 32767. Outputs then move by a lot (cosine 0.75 seen on a two-MatMul model).
VNNI (``vpdpbusd``) and AMX accumulate in 32 bits, and ARM64 kernels do not use that trick, so
they are exact. Two layouts avoid the overflow on AVX2: 7-bit weights (|w| <= 63, so
255·64·2 = 32640 fits; ONNX Runtime's ``reduce_range``) and U8U8 (ONNX Runtime widens both
operands to 16 bits). Both were measured on the demo models (benchmarks/quantize.py; README,
"Targets"): their accuracy is equal within noise (int8-static output cosine 0.99989 vs 0.99996
on the CNN, 0.99992 vs 0.99994 on the encoder, 0.99939 vs 0.99941 on the MobileNetV3 block),
and on a VNNI CPU 7-bit weights run at u8s8's speed while u8u8 is slower (encoder at batch 32:
0.80x vs 0.94x of fp32's latency; MobileNetV3 block 0.70x vs 0.98x). AVX2 timings could not be
taken here (qemu's emulation is faithful in numerics, not in time); ONNX Runtime's AVX2 u8u8
kernel also widens to 16 bits, so 7-bit weights are the choice for saturating targets and
``portable``.

Weight-only int4/int8 (``format=auto``): the CPU kinds (``x86-avx2``, ``x86-vnni``,
``x86-amx``, ``arm64``) get ONNX Runtime's ``com.microsoft`` kernels (MatMulNBits,
GatherBlockQuantized), which ONNX Runtime ships; ``portable`` and ``cuda`` get standard
blocked DequantizeLinear (QDQ), so no custom-domain op is written unless a CPU target or
``format=matmulnbits`` asks for it (ONNX Runtime fuses QDQ into MatMulNBits itself anyway).
"""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path
from typing import Literal

import onnx_ir as ir

from onnxcomp.errors import UsageError

TARGET_NAMES = ("portable", "host", "x86-avx2", "x86-vnni", "x86-amx", "arm64", "cuda")
DEFAULT_TARGET = "portable"
METADATA_TARGET = "onnxcomp.target"
METADATA_LAYOUT = "onnxcomp.int8_layout"
# x86 flags (as /proc/cpuinfo spells them) and ARM64 features that decide a layout or a speed.
X86_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")  # fmt: skip
ARM_FEATURES = ("asimd", "asimddp", "i8mm", "fphp", "bf16", "sve", "sve2")


@dataclasses.dataclass(frozen=True)
class IntegerLayout:
    """How the operands of int8 kernels are stored.

    ``activation`` and ``weight`` are the storage types; ``weight_max`` is the largest weight
    code magnitude (127 for full 8-bit weights, 63 for 7-bit "reduce range" ones).
    """

    name: str
    activation: Literal["uint8", "int8"]
    weight: Literal["int8", "uint8"]
    weight_max: int
    summary: str

    @property
    def weight_bits(self) -> int:
        return 8 if self.weight_max >= 127 else 7


U8S8 = IntegerLayout(
    "u8s8", "uint8", "int8", 127,
    "uint8 activations, 8-bit int8 weights (ONNX Runtime's fast path with VNNI/AMX)",
)  # fmt: skip
U8S8_7BIT = IntegerLayout(
    "u8s8-7bit", "uint8", "int8", 63,
    "uint8 activations, 7-bit int8 weights (no 16-bit overflow on AVX2 without VNNI)",
)  # fmt: skip
U8U8 = IntegerLayout(
    "u8u8", "uint8", "uint8", 127,
    "uint8 activations and weights (weights zero point 128; ONNX Runtime's 16-bit path)",
)  # fmt: skip
S8S8 = IntegerLayout(
    "s8s8", "int8", "int8", 127,
    "int8 activations and weights (ARM64's and GPUs' native form)",
)  # fmt: skip
LAYOUTS = {layout.name: layout for layout in (U8S8, U8S8_7BIT, U8U8, S8S8)}


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """What the OS says about a CPU: architecture, model name and feature flags."""

    arch: str  # "x86_64", "arm64" or what platform.machine() says
    model: str
    flags: frozenset[str]

    @property
    def vnni(self) -> bool:
        return bool({"avx512_vnni", "avx_vnni"} & self.flags)

    @property
    def amx(self) -> bool:
        return "amx_int8" in self.flags

    def describe_flags(self) -> str:
        wanted = X86_FLAGS if self.arch == "x86_64" else ARM_FEATURES
        present = [f for f in wanted if f in self.flags]
        return " ".join(present) or "none of the ones onnxcomp looks at"


@dataclasses.dataclass(frozen=True)
class Target:
    """What a compressed model will run on, and what that implies for integer kernels.

    ``kind`` is one of the concrete targets (``portable``, ``x86-avx2``, ``x86-vnni``,
    ``x86-amx``, ``arm64``, ``cuda``); ``name`` is what the user asked for (``host`` resolves
    to a kind and keeps the CPU it probed in ``cpu``).
    """

    name: str
    kind: str
    cpu: CpuInfo | None = None

    @property
    def saturates(self) -> bool:
        """Whether u8·s8 kernels may overflow 16 bits here (or on some machine it covers)."""
        return self.kind in ("portable", "x86-avx2")

    @property
    def layout(self) -> IntegerLayout:
        """Integer layout of QDQ models (int8-static): activations and weights."""
        if self.kind in ("arm64", "cuda"):
            return S8S8
        return U8S8_7BIT if self.saturates else U8S8

    @property
    def dynamic_layout(self) -> IntegerLayout:
        """Layout of run-time quantised models (int8-dynamic): DynamicQuantizeLinear makes
        uint8 activations whatever the target, so only the weight range changes."""
        return U8S8_7BIT if self.saturates else U8S8

    @property
    def weight_only_format(self) -> Literal["matmulnbits", "qdq"]:
        """How weight-only int4/int8 is written for ``format=auto``: ONNX Runtime's CPU kernels
        (MatMulNBits) on CPU kinds, standard DequantizeLinear elsewhere (see module doc)."""
        return "matmulnbits" if self.kind in ("x86-avx2", "x86-vnni", "x86-amx", "arm64") else "qdq"

    @property
    def int8_speed(self) -> str:
        """What to expect from ONNX Runtime's int8 kernels against float, in a few words."""
        if self.kind in ("x86-vnni", "x86-amx"):
            return "faster than float on Conv/MatMul-heavy models (VNNI/AMX int8 dot products)"
        if self.kind == "x86-avx2":
            return "about float's speed (AVX2 int8 has no dot-product instruction): measure"
        if self.kind == "arm64":
            dotprod = self.cpu is None or "asimddp" in self.cpu.flags
            return ("faster than float (SDOT/UDOT)" if dotprod
                    else "about float's speed (no dot-product extension): measure")  # fmt: skip
        if self.kind == "cuda":
            return "depends on the provider (TensorRT runs QDQ in int8; the CUDA provider does not)"
        return "depends on the machine: measure on it (--target host)"

    def describe(self) -> str:
        text = self.name if self.name == self.kind else f"{self.name} ({self.kind})"
        if self.cpu is not None and self.name == "host":
            text += f", {self.cpu.model}"
        return text


def resolve_target(name: str | Target | None, *, cpu: CpuInfo | None = None) -> Target:
    """The :class:`Target` for a ``--target`` name. ``host`` probes this machine unless
    ``cpu`` describes one (tests inject it)."""
    if isinstance(name, Target):
        return name
    name = name or DEFAULT_TARGET
    if name not in TARGET_NAMES:
        raise UsageError(f"unknown target '{name}' (valid: {', '.join(TARGET_NAMES)})")
    if name != "host":
        return Target(name, name, cpu)
    cpu = cpu or probe_host()
    return Target("host", kind_of(cpu), cpu)


def kind_of(cpu: CpuInfo) -> str:
    """The concrete target a CPU is: which int8 kernels ONNX Runtime picks on it."""
    if cpu.arch in ("arm64", "aarch64"):
        return "arm64"
    if cpu.arch in ("x86_64", "amd64", "AMD64"):
        if cpu.amx:
            return "x86-amx"
        if cpu.vnni:
            return "x86-vnni"
        if "avx2" in cpu.flags:
            return "x86-avx2"
    # Other CPUs (32-bit x86, x86 without AVX2, RISC-V, ...): the layout that is exact everywhere.
    return "portable"


def probe_host(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuInfo:
    """This machine's CPU, from ``/proc/cpuinfo`` (Linux). Elsewhere only the architecture is
    known and flags are empty, which resolves to ``portable``."""
    arch = _normal_arch(platform.machine())
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return CpuInfo(arch, platform.processor() or arch, frozenset())
    return parse_cpuinfo(text, arch)


def parse_cpuinfo(text: str, arch: str) -> CpuInfo:
    """A :class:`CpuInfo` from the text of ``/proc/cpuinfo`` (x86 ``flags`` or ARM
    ``Features`` of the first processor)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # first processor only
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    flags = fields.get("flags") or fields.get("features") or ""
    model = fields.get("model name") or fields.get("cpu model") or fields.get("hardware") or arch
    if arch == "arm64" and model == arch and "cpu part" in fields:
        model = f"ARM64 (CPU part {fields['cpu part']})"
    return CpuInfo(_normal_arch(arch), model, frozenset(flags.split()))


def machine_report(target: Target) -> dict:
    """What ``onnxcomp doctor`` shows: the CPU (probed when the target does not carry one),
    ONNX Runtime's version and providers, and what each quantisation pass does for ``target``."""
    import onnxruntime

    cpu = target.cpu or probe_host()
    static, dynamic = target.layout, target.dynamic_layout
    weight_only = ("DequantizeLinear + float kernels: smaller file, not faster on CPU "
                   "(ONNX Runtime dequantises each run)")  # fmt: skip
    if target.weight_only_format == "matmulnbits":
        weight_only = ("ONNX Runtime's MatMulNBits / GatherBlockQuantized (format=auto): "
                       "smaller, and faster than float where decoding is memory-bound")  # fmt: skip
    passes = [
        {"pass": "int8-static", "layout": static.name,
         "effect": f"{static.summary}; int8 vs float: {target.int8_speed}"},
        {"pass": "int8-dynamic", "layout": dynamic.name,
         "effect": f"{dynamic.summary}; activations quantised at run time (MatMul/Gemm)"},
        {"pass": "int8 / int4 / ternary / binary", "layout": target.weight_only_format,
         "effect": weight_only},
    ]  # fmt: skip
    return {
        "target": target.describe(),
        "kind": target.kind,
        "saturates": target.saturates,
        "int8_speed": target.int8_speed,
        "cpu": {"arch": cpu.arch, "model": cpu.model, "flags": cpu.describe_flags(),
                "vnni": cpu.vnni, "amx": cpu.amx, "host_kind": kind_of(cpu)},
        "onnxruntime": {
            "version": onnxruntime.__version__,
            "providers": onnxruntime.get_available_providers(),
        },
        "passes": passes,
    }


def stamp(model: ir.Model, target: Target, layout: IntegerLayout) -> None:
    """Record in the model's metadata which target and integer layout it was quantised for."""
    model.metadata_props[METADATA_TARGET] = target.kind
    model.metadata_props[METADATA_LAYOUT] = layout.name


def _normal_arch(machine: str) -> str:
    machine = machine.lower()
    if machine in ("x86_64", "amd64"):
        return "x86_64"
    if machine in ("aarch64", "arm64"):
        return "arm64"
    return machine
