"""Compile every Triton kernel of the pack for sm80, sm89 and sm90 with the installed Triton, without a GPU.

`python -m comfy_sage.bench.compile_check [--arch sm90] [-k SUBSTRING] [--regs]`: the attention kernel (FP16, FP8
and fine P·V, full and causal, head dims 40 (padded), 64, 128 and 256, with each arch's tiles from kernels/_arch.py:
pointer loads on sm80/sm89, tensor descriptors on sm90 where this Triton has them, kernels/_compat.py), the fused
quantization and the rope kernel, each through Triton's whole pipeline down to a cubin with its bundled ptxas.
The CPU tests run the kernels in Triton's interpreter, which never meets the compiler; this is the check that a
Triton release still builds them. One line per kernel (--regs: with registers and spill bytes); exits 1 if any
failed. Needs torch and triton, no GPU. All 66 cases compiled with each of Triton 3.2, 3.3, 3.4, 3.5, 3.6, 3.7, 3.8
and 3.9 (2026-12-01; 3.2 and 3.3 without tensor descriptors: sm90 on pointer loads).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from comfy_sage.kernels import _arch, _attention, _quant, _rope
from comfy_sage.kernels._compat import has_tensor_descriptors, launch_options

TRITON = tuple(int(x) for x in triton.__version__.split(".")[:2])
CC = {"sm80": 80, "sm89": 89, "sm90": 90}


def _source(fn, types, consts):
    """An ASTSource for `fn` with runtime argument types {name: type string} (pointers taken as 16-byte
    aligned, as torch allocates them) and constexpr values {name: value}."""
    aligned = [fn.arg_names.index(n) for n, t in types.items() if t.startswith("*")]
    if TRITON < (3, 3):  # constants by name, a signature without them, attributes as an AttrsDescriptor
        from triton.backends.compiler import AttrsDescriptor

        return triton.compiler.ASTSource(fn=fn, signature=dict(types), constants=dict(consts),
                                         attrs=AttrsDescriptor.from_hints({i: 16 for i in aligned}))
    sig = {n: types.get(n, "constexpr") for n in fn.arg_names}
    return triton.compiler.ASTSource(fn=fn, signature=sig,
                                     constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                                     attrs={(i,): [["tt.divisibility", 16]] for i in aligned})


def _types(fn, given, default="i32"):
    return {n: given.get(n, default) for n in fn.arg_names if n not in given.get("_const", ())}


def attention_case(arch, D, pv, causal, dtype="fp16"):
    entry = _arch.ARCHES[arch]
    DP = _arch.head_dim_bucket(D)
    DS = (D + 7) // 8 * 8
    tile = entry.tiles[(DP, "fp16" if pv == "fine" else pv)]
    fp8 = pv == "fp8"
    tma = tile.tma and has_tensor_descriptors() and DS % 16 == 0  # as _attention.attention decides
    bm, bn = tile.block_m, tile.block_n
    consts = dict(D=D, DP=DP, DS=DS, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, PV_FP8=fp8, STORE_LSE=True,
                  P_SHIFT=_attention.P_SHIFT_FP8 if fp8 else 0.0, USE_TMA=tma, K_TOKEN=pv == "fine")
    vt = "fp8e4nv" if fp8 else dtype
    given = {"Q8": "*i8", "K8": "*i8", "V": f"*{vt}", "QS": "*fp32", "KS": "*fp32", "VS": "*fp32", "O": f"*{dtype}",
             "LSE": "*fp32", "_const": consts}
    if tma:
        given.update(Q8=f"tensordesc<i8[1, {bm}, {DP}]>", K8=f"tensordesc<i8[1, {bn}, {DP}]>",
                     V=f"tensordesc<{vt}[1, {DP}, {bn}]>" if fp8 else f"tensordesc<{vt}[1, 1, {bn}, {DP}]>")
    opts = {"num_warps": tile.num_warps, "num_stages": tile.num_stages, **launch_options(tile.maxnreg)}
    name = (f"attention {arch} D={D} pv={pv}{' causal' if causal else ''}{'' if dtype == 'fp16' else ' ' + dtype}"
            f" {'tma' if tma else 'pointers'} {bm}x{bn} w{tile.num_warps} s{tile.num_stages}"
            f"{f' maxnreg={tile.maxnreg}' if tile.maxnreg else ''}")
    return name, _attention._attn_kernel, _types(_attention._attn_kernel, given), consts, opts


def quant_case(arch, D, fp8_v, k_token, dtype="fp16"):
    tile = _arch.ARCHES[arch].tiles[(_arch.head_dim_bucket(D), "fp8" if fp8_v else "fp16")]
    consts = dict(D=D, DP=_arch.head_dim_bucket(D), DS=(D + 7) // 8 * 8, BLOCK_Q=tile.block_m, BLOCK_K=tile.block_n,
                  SAMPLE_N=_quant.SAMPLE, QUANT_V=fp8_v, K_TOKEN=k_token)
    fn = _quant._quant_kernel
    given = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "Q8": "*i8", "QS": "*fp32", "K8": "*i8",
             "KS": "*fp32", "KM": "*fp32", "V8": "*fp8e4nv" if fp8_v else "*i8", "VS": "*fp32", "q_mult": "fp32",
             "_const": consts}
    name = f"quantize {arch} D={D}{' fp8 v' if fp8_v else ''}{' k per token' if k_token else ''} {dtype}"
    return name, fn, _types(fn, given), consts, {"num_warps": 4, **launch_options()}


def rope_case(arch, D, dtype):
    consts = dict(DT=tl.float16 if dtype == "fp16" else tl.bfloat16, HALF=D // 2,
                  HALF_P=triton.next_power_of_2(D // 2), BLOCK_T=_rope.BLOCK_T)
    fn = _rope._rotate_kernel
    given = {"X": "*i32", "C": "*fp32", "S": "*fp32", "O": "*i32", "_const": consts}
    return f"rope {arch} D={D} {dtype}", fn, _types(fn, given), consts, {"num_warps": 4, **launch_options()}


def cases(arches):
    for arch in arches:
        pvs = ("fp16", "fp8", "fine") if _arch.ARCHES[arch].fp8 else ("fp16", "fine")
        for D in (64, 128):
            for pv in pvs:
                for causal in (False, True):
                    yield arch, attention_case(arch, D, pv, causal)
        yield arch, attention_case(arch, 128, "fp16", False, "bf16")
        yield arch, attention_case(arch, 40, pvs[-2], True)  # padded head dim, 8-byte rows: pointers everywhere
        yield arch, attention_case(arch, 256, pvs[-2], False)
        for D in (40, 128):
            for fp8_v, k_token in ((False, False), (False, True)) + (((True, False),) if "fp8" in pvs else ()):
                yield arch, quant_case(arch, D, fp8_v, k_token)
        yield arch, quant_case(arch, 64, False, False, "bf16")
        for D, dtype in ((128, "fp16"), (80, "bf16")):
            yield arch, rope_case(arch, D, dtype)


def resources(kernel):
    """Registers and stack bytes per thread (spills), from the cubin by Triton's bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f", {m.group(1)} registers, stack {m.group(2)} B" if m else ""


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", action="append", choices=sorted(CC), help="default: all")
    ap.add_argument("-k", default="", help="only cases whose name contains this")
    ap.add_argument("--regs", action="store_true", help="also registers and spills (cuobjdump)")
    a = ap.parse_args(argv)
    print(f"triton {triton.__version__}, tensor descriptors: {has_tensor_descriptors()}")
    failed = 0
    for arch, (name, fn, types, consts, opts) in cases(a.arch or sorted(CC)):
        if a.k not in name:
            continue
        t0 = time.time()
        try:
            k = triton.compile(_source(fn, types, consts), target=GPUTarget("cuda", CC[arch], 32), options=opts)
            assert k.asm.get("cubin"), "no cubin"
            print(f"ok    {time.time() - t0:5.1f}s  {name}  (shared {k.metadata.shared} B"
                  f"{resources(k) if a.regs else ''})", flush=True)
        except Exception as e:  # noqa: BLE001 - report every case, then fail
            failed += 1
            msg = f"{type(e).__name__}: {e}".strip().splitlines()
            print(f"FAIL  {time.time() - t0:5.1f}s  {name}: {msg[0] if msg else ''}", flush=True)
            for line in traceback.format_exc().splitlines()[-12:]:
                print("        " + line)
    print(f"{failed} failed" if failed else "all compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
