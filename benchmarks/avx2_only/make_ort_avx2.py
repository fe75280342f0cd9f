"""Copy the installed onnxruntime package into a folder and patch its native libraries so that,
with cpuid_trap.so preloaded, ONNX Runtime sees an AVX2-only x86-64 CPU (see cpuid_trap.c).

    python benchmarks/avx2_only/make_ort_avx2.py /tmp/ort-avx2   # then: run.sh does the rest

Needs binutils (objdump, readelf) and an x86-64 Linux host. Every `cpuid` instruction objdump
finds becomes `int3; nop` (two bytes for two bytes, so nothing moves).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

CPUID = b"\x0f\xa2"
TRAP = b"\xcc\x90"


def load_segments(library: Path) -> list[tuple[int, int, int]]:
    """(virtual address, file offset, file size) of each LOAD segment."""
    text = subprocess.run(["readelf", "-lW", str(library)], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    segments = []
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "LOAD":
            offset, vaddr, _, filesz = (int(f, 16) for f in fields[1:5])
            segments.append((vaddr, offset, filesz))
    return segments


def cpuid_offsets(library: Path) -> list[int]:
    """File offsets of every cpuid instruction in ``library``'s code."""
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    addresses = [int(m.group(1), 16) for m in re.finditer(r"^\s*([0-9a-f]+):\s+cpuid\s*$",
                                                          listing, re.MULTILINE)]  # fmt: skip
    segments = load_segments(library)
    offsets = []
    for address in addresses:
        for vaddr, offset, size in segments:
            if vaddr <= address < vaddr + size:
                offsets.append(address - vaddr + offset)
                break
        else:
            raise SystemExit(f"{library}: cpuid at {address:#x} is in no LOAD segment")
    return offsets


def patch(library: Path) -> int:
    data = bytearray(library.read_bytes())
    offsets = cpuid_offsets(library)
    for offset in offsets:
        if data[offset : offset + 2] != CPUID:
            raise SystemExit(f"{library}: no cpuid at file offset {offset:#x}")
        data[offset : offset + 2] = TRAP
    library.write_bytes(bytes(data))
    return len(offsets)


def main() -> int:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    import onnxruntime

    source = Path(onnxruntime.__file__).parent
    target = Path(sys.argv[1]) / "onnxruntime"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    for library in sorted((target / "capi").glob("*.so*")):
        if "providers_shared" not in library.name:
            print(f"{library.name}: {patch(library)} cpuid instructions trapped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
