"""Targets: CPU descriptions -> target kind -> integer layout, whatever CPU runs the tests.

The CPU texts are trimmed copies of real /proc/cpuinfo entries; the host itself is never
consulted here except where a test says so (and then asserts what holds on every CPU).
"""

from __future__ import annotations

import json

import pytest

from onnxcomp.cli import main
from onnxcomp.errors import UsageError
from onnxcomp.target import (
    S8S8,
    U8S8,
    U8S8_7BIT,
    CpuInfo,
    kind_of,
    parse_cpuinfo,
    probe_host,
    resolve_target,
)

EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni

processor\t: 1
model name\t: AMD EPYC 7B12
flags\t\t: fpu avx512_vnni
"""
XEON_VNNI = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz
flags\t\t: sse4_2 avx f16c avx2 fma avx512f avx512bw avx512_vnni
"""
XEON_AMX = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: avx2 avx512f avx512_vnni avx_vnni amx_bf16 amx_tile amx_int8
"""
ALDER_LAKE = """processor\t: 0
model name\t: 12th Gen Intel(R) Core(TM) i7-1260P
flags\t\t: avx2 fma avx_vnni
"""
GRAVITON = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp sve i8mm
CPU part\t: 0xd40
"""


@pytest.mark.parametrize(
    ("text", "arch", "kind"),
    [
        (EPYC_AVX2, "x86_64", "x86-avx2"),
        (XEON_VNNI, "x86_64", "x86-vnni"),
        (XEON_AMX, "x86_64", "x86-amx"),
        (ALDER_LAKE, "x86_64", "x86-vnni"),
        (GRAVITON, "aarch64", "arm64"),
        ("processor\t: 0\nflags\t\t: sse2 avx\n", "x86_64", "portable"),
    ],
)
def test_cpu_descriptions_resolve_to_the_kernels_onnxruntime_picks(text, arch, kind):
    cpu = parse_cpuinfo(text, arch)
    assert kind_of(cpu) == kind
    assert resolve_target("host", cpu=cpu).kind == kind


def test_only_the_first_processor_is_read():
    """A later processor's flags (here avx512_vnni) must not make an AVX2 CPU look VNNI."""
    cpu = parse_cpuinfo(EPYC_AVX2, "x86_64")
    assert cpu.model == "AMD EPYC 7B12" and not cpu.vnni and "avx2" in cpu.flags


@pytest.mark.parametrize(
    ("name", "static", "dynamic", "saturates"),
    [
        ("portable", U8S8_7BIT, U8S8_7BIT, True),
        ("x86-avx2", U8S8_7BIT, U8S8_7BIT, True),
        ("x86-vnni", U8S8, U8S8, False),
        ("x86-amx", U8S8, U8S8, False),
        ("arm64", S8S8, U8S8, False),
        ("cuda", S8S8, U8S8, False),
    ],
)
def test_each_target_gets_a_layout_that_is_exact_there(name, static, dynamic, saturates):
    target = resolve_target(name)
    assert (target.layout, target.dynamic_layout, target.saturates) == (
        static, dynamic, saturates
    )  # fmt: skip
    if saturates:  # two u8 x weight products must fit a signed 16-bit lane
        assert 2 * 255 * (target.layout.weight_max + 1) <= 32767


def test_host_layout_is_exact_on_the_cpu_running_the_tests():
    """Whatever this CPU is, `host` never picks 8-bit u8s8 weights for an AVX2-only one."""
    cpu = probe_host()
    target = resolve_target("host", cpu=cpu)
    if cpu.arch == "x86_64" and "avx2" in cpu.flags and not (cpu.vnni or cpu.amx):
        assert target.dynamic_layout.weight_max == 63
    assert resolve_target("host").kind == target.kind


def test_unknown_target_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown target 'x86-avx9'"):
        resolve_target("x86-avx9")


def test_a_missing_cpuinfo_file_resolves_to_portable(tmp_path):
    cpu = probe_host(tmp_path / "no-such-file")
    assert cpu.flags == frozenset() and kind_of(CpuInfo("x86_64", "?", cpu.flags)) == "portable"


def test_doctor_reports_cpu_runtime_and_each_pass(capsys):
    assert main(["doctor", "--target", "x86-avx2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "x86-avx2" and report["saturates"] is True
    assert "CPUExecutionProvider" in report["onnxruntime"]["providers"]
    layouts = {row["pass"]: row["layout"] for row in report["passes"]}
    assert layouts["int8-static"] == layouts["int8-dynamic"] == "u8s8-7bit"
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "instruction sets" in out and "int8-dynamic" in out
