#!/usr/bin/env bash
# Run a command as if on an AVX2-only x86-64 CPU (AMD EPYC Rome/Milan, Haswell..Coffee Lake
# Xeons), natively, on a newer x86-64 CPU with AVX-512 / VNNI / AMX:
#   - ONNX Runtime: a patched copy (make_ort_avx2.py) whose cpuid is answered by cpuid_trap.so
#     without the AVX-512/VNNI/AMX bits, so MLAS runs its AVX2 kernels (u8s8 saturation included);
#   - onnxcomp's host probe: /proc/cpuinfo bind-mounted without those flags (needs root and
#     unshare; without them, `--target host` still sees the real CPU and this says so);
#   - torch: ATEN_CPU_CAPABILITY=avx2.
# numpy keeps its own dispatch (it does not saturate). Timings are those of the AVX2 code path
# on this CPU's cores, not of an older CPU; the README's "Targets" section says how to read them.
#
#   benchmarks/avx2_only/run.sh python -m pytest -n 2 -q tests/passes/test_quantize_static.py
#   benchmarks/avx2_only/run.sh python benchmarks/quantize.py
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${AVX2_ONLY_DIR:-/tmp/onnxcomp-avx2-only}"
python="$(command -v python || command -v python3)"
mkdir -p "$cache"
version="$("$python" -c 'import onnxruntime; print(onnxruntime.__version__)')"
if [ ! -f "$cache/cpuid_trap.so" ] || [ "$here/cpuid_trap.c" -nt "$cache/cpuid_trap.so" ]; then
    cc -O2 -shared -fPIC "$here/cpuid_trap.c" -o "$cache/cpuid_trap.so"
fi
if [ "$(cat "$cache/ort-version" 2>/dev/null)" != "$version" ]; then
    "$python" "$here/make_ort_avx2.py" "$cache/ort" >&2
    echo "$version" > "$cache/ort-version"
fi
# keep every flag line, less AVX-512 / VNNI / AMX (avx512*, avx_vnni*, amx*)
grep -E '^flags' /proc/cpuinfo \
    | sed -E 's/ (avx512[a-z0-9_]*|avx_vnni[a-z0-9_]*|amx[a-z0-9_]*)\b//g' > "$cache/flags"
awk -v flagsfile="$cache/flags" '
    BEGIN { while ((getline line < flagsfile) > 0) flags[n++] = line }
    /^flags/ { print flags[i++]; next } { print }' /proc/cpuinfo > "$cache/cpuinfo"
export PYTHONPATH="$cache/ort${PYTHONPATH:+:$PYTHONPATH}"
export LD_PRELOAD="$cache/cpuid_trap.so${LD_PRELOAD:+:$LD_PRELOAD}"
export ATEN_CPU_CAPABILITY=avx2
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null; then
    exec unshare -m sh -c 'mount --bind "$0" /proc/cpuinfo && exec "$@"' "$cache/cpuinfo" "$@"
fi
echo "avx2_only: not root, /proc/cpuinfo still shows this CPU's flags (--target host sees them)" >&2
exec "$@"
