"""Compile the kernels for a GPU on a machine without one and report what costs no device time.

`python bench/sass.py [--arch 90] [--dim 128] [--block-n 128] [--stages 2] [--maxnreg 168] [--fp16 | --fine]
[--causal] [--pointer] [--dump FILE]`: registers, stack (spills), shared memory and the opcodes of the key-block
loops (instructions per thread per block). Needs only the `triton` package, the version the GPU runs (3.6 on the
lent machine: its bundled ptxas and cuobjdump); it loads kernels/_attention.py alone, so no torch either.
bench/NOTES.md quotes these counts. The helpers here are also what bench/arch_check.py compiles every table
entry with. Kernels compile with the divisibility a launch gives its pointers and padded sizes (_DIVISIBLE); the
counts in NOTES.md were taken without it (today's sm90 hd128 FP8 kernel on 3.6: 519 loop instructions and 32 B
of stack without, 508 and none with).
"""
import argparse
import collections
import importlib
import os
import re
import subprocess
import sys
import tempfile
import types

import triton
from triton.backends.compiler import GPUTarget

KERNELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
_PKG = "_comfy_sage_kernels"  # kernels/ as a bare package: its modules load without kernels/__init__ (torch)


def kernel_module(name):
    """kernels/<name>.py imported on its own (relative imports between kernel modules work; the package's
    __init__, which imports torch and the custom ops, never runs)."""
    if _PKG not in sys.modules:
        pkg = types.ModuleType(_PKG)
        pkg.__path__ = [KERNELS]
        sys.modules[_PKG] = pkg
    return importlib.import_module(f"{_PKG}.{name}")


# What a launch specializes on: pointers from torch allocations and these integers (multiples of 16 in every call
# of a bucket's own head dim: padded token counts, strides of contiguous tensors) get tt.divisibility=16, as
# Triton's launcher gives them; the others (head and token counts) stay plain i32.
_DIVISIBLE = {"Nq_pad", "Nk_pad", "svb", "svh", "svn", "sob", "soh", "son",
              "sqb", "sqh", "sqn", "skb", "skh", "skn"}


def _compile(fn, arch, types_, const, opts, source=None):
    sig = {name: types_.get(name, "i32") for name in fn.arg_names}
    for k in const:
        sig[k] = "constexpr"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*") or name in _DIVISIBLE}
    src = (source or triton.compiler.ASTSource)(fn=fn, signature=sig, attrs=attrs,
                                                 constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def compile_attention(fn, *, arch=90, D, block_m, block_n, fp8, causal, warps, stages, maxnreg, k_token=False,
                      tma=True, store_lse=False, extra=None):
    """_attention._attn_kernel as _attention.attention launches it for a head dim D with no padding: through
    tensor descriptors (tma) or pointers, FP8 or 16-bit V, fp16 output."""
    if tma:
        shapes = {"Q8": [1, block_m, D], "K8": [1, block_n, D], "V": [1, D, block_n] if fp8 else [1, 1, block_n, D]}
        dt = {"Q8": "i8", "K8": "i8", "V": "fp8e4nv" if fp8 else "fp16"}
        types_ = {k: f"tensordesc<{dt[k]}{shapes[k]}>" for k in shapes}
    else:
        types_ = {"Q8": "*i8", "K8": "*i8", "V": "*fp8e4nv" if fp8 else "*fp16"}
    types_.update({k: "*fp32" for k in ("QS", "KS", "VS", "LSE")}, O="*fp16")
    const = dict(D=D, DP=D, DS=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, PV_FP8=fp8, STORE_LSE=store_lse,
                 P_SHIFT=8.806 if fp8 else 0.0, USE_TMA=tma, K_TOKEN=k_token, **(extra or {}))
    opts = {"num_warps": warps, "num_stages": stages}
    if maxnreg:
        opts["maxnreg"] = maxnreg
    return _compile(fn, arch, types_, const, opts)


def compile_sm90(fn, **kw):
    return compile_attention(fn, arch=90, **kw)


def compile_quant(fn, *, arch, D, block_m, block_n, fp8_v, k_token, warps=4, lse=False):
    """_quant._quant_kernel as _quant.quantize launches it (fp16 q, k, v; num_stages left at Triton's default)."""
    types_ = {"Q": "*fp16", "K": "*fp16", "V": "*fp16", "Q8": "*i8", "K8": "*i8", "V8": "*fp8e4nv" if fp8_v else "*i8",
              "q_mult": "fp32"}
    types_.update({k: "*fp32" for k in ("QS", "LSE", "KS", "KM", "VS")})
    const = dict(D=D, DP=D, DS=D, BLOCK_Q=block_m, BLOCK_K=block_n, SAMPLE_N=64, QUANT_V=fp8_v, K_TOKEN=k_token,
                 Q_DOT_KMEAN=lse)
    return _compile(fn, arch, types_, const, {"num_warps": warps})


def compile_ws(fn, *, D, block_m, block_n, consumers, stages, maxnreg, consumer_regs, store_lse=False):
    """_attention_ws._attn_ws_kernel (Gluon, sm90) as _attention_ws.attention launches it."""
    import torch  # the descriptors' type strings come from Gluon's own descriptor class
    from triton.experimental.gluon import _runtime, language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    def desc(dtype, gdtype, block):
        t = torch.empty(block, dtype=dtype)
        lay = gl.NVMMASharedLayout.get_default_for(block, gdtype)
        return mangle_type(TensorDescriptor(t, block, [block[1], 1], block, lay))

    types_ = {"q_desc": desc(torch.int8, gl.int8, [block_m, D]), "k_desc": desc(torch.int8, gl.int8, [block_n, D]),
              "v_desc": desc(torch.float8_e4m3fn, gl.float8e4nv, [D, block_n]), "O": "*fp16"}
    types_.update({k: "*fp32" for k in ("QS", "KS", "VS", "LSE")})
    const = dict(BLOCK_M=block_m, BLOCK_N=block_n, STORE_LSE=store_lse, CONSUMERS=consumers, STAGES=stages,
                 CONSUMER_REGS=consumer_regs)
    return _compile(fn, 90, types_, const, {"num_warps": 4, "maxnreg": maxnreg}, source=_runtime.GluonASTSource)


def tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def cuobjdump(kernel, flag):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([tool("cuobjdump"), flag, f.name], capture_output=True, text=True, check=True).stdout


def resources(kernel):
    """Registers, stack (bytes of local memory per thread: spills, for these kernels) and shared memory: the
    cubin's static shared (cuobjdump) and the dynamic shared the launch asks for (Triton's metadata)."""
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", cuobjdump(kernel, "--dump-resource-usage"))
    regs, stack, static = map(int, usage.groups())
    dynamic = int(kernel.metadata.shared)
    return {"regs": regs, "stack": stack, "shared_static": static, "shared_dynamic": dynamic,
            "shared": static + dynamic}


def loops(text):
    """Opcode counts of each loop body (a backward branch), spin-waits and the long jumps of the epilogue left out:
    the first two are the kernel's unmasked and masked key-block loops."""
    lines = [line for line in text.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]{4})\*/", line).group(1), 16) for line in lines]
    out = []
    for i, line in enumerate(lines):
        tgt = re.search(r"BRA 0x([0-9a-f]+)", line)
        if tgt and int(tgt.group(1), 16) in addr[:i]:
            j = addr.index(int(tgt.group(1), 16))
            if 16 < i - j < 1500:
                out.append(collections.Counter(
                    re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", x).group(1)
                    for x in lines[j:i + 1]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90, help="compute capability: 80, 86, 89, 90, 120")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block-m", type=int, default=64)
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--maxnreg", type=int, default=168)
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--fine", action="store_true")
    ap.add_argument("--pointer", action="store_true", help="pointer loads instead of tensor descriptors")
    ap.add_argument("--dump", help="write the SASS here")
    a = ap.parse_args(argv)

    k = compile_attention(kernel_module("_attention")._attn_kernel, arch=a.arch, D=a.dim, block_m=a.block_m,
                          block_n=a.block_n, fp8=not (a.fp16 or a.fine), causal=a.causal, warps=a.warps,
                          stages=a.stages, maxnreg=a.maxnreg or None, k_token=a.fine, tma=not a.pointer)
    text = cuobjdump(k, "--dump-sass")
    if a.dump:
        open(a.dump, "w").write(text)
    print("registers {regs}, stack {stack} B, shared {shared} B".format(**resources(k)))
    for ops in loops(text)[:2]:  # unmasked, masked
        print(f"loop of {sum(ops.values())} instructions: " + ", ".join(f"{o} {n}" for o, n in ops.most_common(14)))


if __name__ == "__main__":
    main()
