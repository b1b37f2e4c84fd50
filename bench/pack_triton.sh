#!/usr/bin/env bash
# Packs a Triton release (and SageAttention 2) small enough to carry to the lent H200 beside the tree (64 MiB a call),
# for timing our kernels on a Triton other than the machine's (bench/NOTES.md, sessions 14-16).
#   bash bench/pack_triton.sh [VERSION]   (default 3.9.0): .tw/triton-VERSION-sm90.tar.xz and, where ../shared/peers
#   has it, .tw/sageattention-2.2.0-sm90.tar.xz
# On the device: mkdir -p /tmp/tw && tar -xJf .tw/triton-VERSION-sm90.tar.xz -C /tmp/tw and put /tmp/tw first on
# PYTHONPATH (and .tw/lib, after tar -xJf .tw/sageattention-2.2.0-sm90.tar.xz -C .tw/lib, for SageAttention 2).
# Kept: what compiles for sm90 with the ptxas that release itself runs there. From 3.9 that is ptxas-blackwell (a
# newer CUDA than `ptxas`, which compiles sm80-89 only), so ptxas-blackwell stays and `ptxas` becomes a link to it;
# before 3.9 there is one ptxas. Dropped: AMD, profiler and debugging pieces, headers, nvdisasm.
set -euo pipefail
ver=${1:-3.9.0}
top=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip download -q "triton==$ver" --no-deps --python-version 3.12 --only-binary=:all: \
    --platform manylinux_2_28_x86_64 -d "$work/wheel"
mkdir -p "$work/x" && (cd "$work/x" && python -m zipfile -e "$work"/wheel/triton-*.whl .)
t="$work/x/triton"
rm -rf "$t/backends/amd/lib" "$t"/backends/nvidia/lib/cupti* "$t/_C/libproton.so" "$t/instrumentation" "$t/plugins" \
    "$t/include" "$t/FileCheck" "$t/backends/nvidia/bin/nvdisasm"
bin="$t/backends/nvidia/bin"
if [ -f "$bin/ptxas-blackwell" ]; then
    rm "$bin/ptxas" && ln -s ptxas-blackwell "$bin/ptxas"
    chmod +x "$bin/ptxas-blackwell"
else
    chmod +x "$bin/ptxas"
fi
chmod +x "$bin/cuobjdump"
strip --strip-unneeded "$t/_C/libtriton.so"
mkdir -p "$top/.tw"
(cd "$work/x" && tar -cf - triton) | xz -T2 -9e > "$top/.tw/triton-$ver-sm90.tar.xz"
sa2=$(ls "$top"/../shared/peers/sageattention-2.2.0-sm90-*.tar.gz 2>/dev/null | head -1 || true)
if [ -n "$sa2" ]; then
    mkdir -p "$work/sa2" && tar -xzf "$sa2" -C "$work/sa2"
    (cd "$work/sa2" && tar -cf - .) | xz -9e > "$top/.tw/sageattention-2.2.0-sm90.tar.xz"
fi
ls -la "$top/.tw"
