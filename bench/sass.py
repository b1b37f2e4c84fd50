"""Compile the kernels for a GPU on a machine without one and report what costs no device time.

`python bench/sass.py [--arch 90] [--dim 128] [--block-n 128] [--stages 2] [--maxnreg 168] [--fp16 | --fine]
[--causal] [--pointer] [--dump FILE]`: registers, stack (spills), shared memory and the opcodes of the key-block
loops (instructions per thread per block). Needs only the `triton` package, the version the GPU runs (3.6 on the
lent machine: its bundled ptxas and cuobjdump); it loads kernels/_attention.py alone, so no torch either (the
quantization, rope and sparse selection kernels' modules import torch). bench/NOTES.md quotes these counts. The
helpers here are also what bench/arch_check.py compiles every table entry with, on any Triton from 3.2 to 3.9
(_compile: both ASTSource APIs). Kernels compile with the divisibility a launch gives its pointers, padded sizes and
strides (_divisible); the counts in NOTES.md were taken without it (today's sm90 hd128 FP8 kernel on 3.6: 519 loop
instructions and 32 B of stack without, 508 and none with).
"""
import argparse
import collections
import importlib
import inspect
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


def compat():
    """kernels/_compat.py: what the installed Triton offers (tensor descriptors) and the launch options every
    launch of ours passes."""
    return kernel_module("_compat")


def head_dim_bucket(d):
    return kernel_module("_arch").head_dim_bucket(d)


def launch_path(tile, D):
    """(tensor descriptors, maxnreg) of a launch at head dim D with `tile`, as _attention.attention decides: a tma
    tile goes through tensor descriptors only where this Triton has them (3.4+) and the int8 rows
    (_quant.row_bytes) are 16-byte multiples; otherwise it takes the pointer path with the tile's pointer_maxnreg.
    A pointer tile keeps its maxnreg."""
    use = bool(tile.tma) and compat().has_tensor_descriptors() and kernel_module("_quant").row_bytes(D) % 16 == 0
    return use, (tile.maxnreg if use or not tile.tma else tile.pointer_maxnreg)


# What a launch specializes on: Triton's launcher gives tt.divisibility=16 to pointers (torch allocations) and to
# integers that are multiples of 16; head counts, token counts and the GQA group stay plain i32 here. Strides are
# those of the calls the pack's integrations make (nodes/_runtime.py, diffusers' processors): q, k and v as
# head-split views of [B, N, H·D] (token and batch strides multiples of H·D, which is 16-divisible for every real
# model's hidden size; head stride D) and the output as _api allocates it, contiguous [B, H, N, D] (token stride
# D, head and batch strides multiples of D). A multiple of D counts as divisible only where D is: with D % 16 != 0
# it is for some token counts only (compiled as the general case). A contiguous [B, H, N, D] input at such a D
# (token stride D) is a variant not compiled here.
_ALWAYS = {"Nq_pad", "Nk_pad",  # whole blocks
           "sqb", "sqn", "skb", "skn", "svb", "svn"}  # multiples of H·D
_BY_D = {"sqh", "skh", "svh", "sob", "soh", "son"}  # multiples of D


def _divisible(D):
    return _ALWAYS | (_BY_D if D % 16 == 0 else set())


def _new_source_api():
    """Triton 3.3 changed ASTSource: constexprs by argument path in a signature that names every argument (3.2:
    constants by name, a signature without them, hints in an AttrsDescriptor)."""
    return "constexprs" in inspect.signature(triton.compiler.ASTSource.__init__).parameters


def _compile(fn, arch, types_, const, opts, source=None, divisible=()):
    """triton.compile of `fn` for compute capability `arch`: arguments typed by `types_` (default i32), the
    constexprs `const`, pointers and the integers named in `divisible` specialized as multiples of 16 (what the
    launcher does for such values); the same on every Triton from 3.2 to 3.9."""
    names = fn.arg_names
    hints = [i for i, n in enumerate(names)
             if n not in const and (types_.get(n, "i32").startswith("*") or n in divisible)]
    if _new_source_api():
        sig = {n: "constexpr" if n in const else types_.get(n, "i32") for n in names}
        src = (source or triton.compiler.ASTSource)(
            fn=fn, signature=sig, attrs={(i,): [["tt.divisibility", 16]] for i in hints},
            constexprs={(names.index(k),): v for k, v in const.items()})
    else:
        from triton.backends.compiler import AttrsDescriptor

        assert source is None, "Gluon needs Triton 3.6"
        src = triton.compiler.ASTSource(fn=fn, signature={n: types_.get(n, "i32") for n in names if n not in const},
                                        constants=dict(const), attrs=AttrsDescriptor.from_hints({i: 16 for i in hints}))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def _options(warps, stages=None, maxnreg=None):
    """num_warps (num_stages where the launch sets it) and the options every launch of ours passes
    (_compat.launch_options: FP fusion on, the register cap where set)."""
    return {"num_warps": warps, **({"num_stages": stages} if stages else {}), **compat().launch_options(maxnreg)}


def compile_attention(fn, *, arch=90, D, block_m, block_n, fp8, causal, warps, stages, maxnreg, k_token=False,
                      tma=True, store_lse=False, dtype="fp16", extra=None, int8=False, sparse=False):
    """_attention._attn_kernel as _attention.attention launches it at head dim D (padded to its bucket DP, with
    masks where D != DP; int8 rows of _quant.row_bytes(D) bytes): through tensor descriptors (tma) or pointers,
    exactly as given (launch_path() gives what a launch picks), FP8, INT8 (with per-token K scales) or 16-bit V,
    `dtype` (fp16, bf16) for v and the output; `sparse`: the block-sparse variant (a list of key blocks per tile)."""
    DP = head_dim_bucket(D)
    v8 = "fp8e4nv" if fp8 else "i8" if int8 else None
    if tma:
        shapes = {"Q8": [1, block_m, DP], "K8": [1, block_n, DP], "V": [1, DP, block_n] if v8 else [1, 1, block_n, DP]}
        dt = {"Q8": "i8", "K8": "i8", "V": v8 or dtype}
        types_ = {k: f"tensordesc<{dt[k]}{shapes[k]}>" for k in shapes}
    else:
        types_ = {"Q8": "*i8", "K8": "*i8", "V": f"*{v8 or dtype}"}
    types_.update({k: "*fp32" for k in ("QS", "KS", "VS", "LSE")}, O=f"*{dtype}", VC="*i16", LUT="*i32", CNT="*i32")
    if int8:
        types_["VS"] = "*bf16"
    attention = kernel_module("_attention")
    p_shift = attention.P_SHIFT_FP8 if fp8 else attention.P_SHIFT_INT8 if int8 else 0.0
    const = dict(D=D, DP=DP, DS=kernel_module("_quant").row_bytes(D), BLOCK_M=block_m, BLOCK_N=block_n,
                 CAUSAL=causal, PV_FP8=fp8, STORE_LSE=store_lse,
                 P_SHIFT=p_shift, USE_TMA=tma, K_TOKEN=k_token or int8, PV_INT8=int8, SPARSE=sparse,
                 **(extra or {}))
    return _compile(fn, arch, types_, const, _options(warps, stages, maxnreg), divisible=_divisible(D))


def compile_sm90(fn, **kw):
    return compile_attention(fn, arch=90, **kw)


def compile_quant(fn, *, arch, D, block_m, block_n, fp8_v, k_token, warps=4, lse=False, dtype="fp16", int8_v=False,
                  maxnreg=None):
    """_quant._quant_kernel as _quant.quantize launches it (q, k, v of `dtype`; num_stages left at Triton's
    default) at head dim D, padded to its bucket; `int8_v` as for pv="int8" (per-token K); q and k rotated on every
    path but FP8 (_quant.rotation_for)."""
    quant = kernel_module("_quant")
    types_ = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "Q8": "*i8", "K8": "*i8",
              "V8": "*fp8e4nv" if fp8_v else "*i8", "q_mult": "fp32", "VC": "*i16" if int8_v else "*fp32"}
    types_.update({k: "*fp32" for k in ("QS", "LSE", "KS", "KM")}, VS="*bf16" if int8_v else "*fp32")
    const = dict(D=D, DP=head_dim_bucket(D), DS=quant.row_bytes(D), BLOCK_Q=block_m, BLOCK_K=block_n,
                 SAMPLE_N=quant.SAMPLE, QUANT_V=fp8_v or int8_v, K_TOKEN=k_token or int8_v, Q_DOT_KMEAN=lse,
                 V_INT8=int8_v, ROT=quant.rotation_for("fp8" if fp8_v else "fp16", D))
    return _compile(fn, arch, types_, const, _options(warps, maxnreg=maxnreg), divisible=_divisible(D))


def compile_rope(fn, *, arch, D, dtype):
    """_rope._rotate_kernel as _rope._rotate launches it for a contiguous [B, N, H, D] tensor of `dtype` (fp16,
    bf16): x and the output as 32-bit words (one pair each); token and batch strides multiples of H·D/2 (taken as
    16-divisible, as above), the head stride D/2 and the table's batch stride N·D/2 divisible where D/2 is."""
    import triton.language as tl

    rope = kernel_module("_rope")
    types_ = {"X": "*i32", "C": "*fp32", "S": "*fp32", "O": "*i32"}
    const = dict(DT={"fp16": tl.float16, "bf16": tl.bfloat16}[dtype], HALF=D // 2,
                 HALF_P=triton.next_power_of_2(D // 2), BLOCK_T=rope.BLOCK_T)
    divisible = {"sxb", "sxn"} | ({"sxh", "scb"} if (D // 2) % 16 == 0 else set())
    return _compile(fn, arch, types_, const, _options(4), divisible=divisible)


def select_launch(nkb):
    """(NKB, ROWS, num_warps) of _sparse.select's launch of _select_kernel for `nkb` key blocks (at most
    _sparse.MAX_KEY_BLOCKS; more go to _select_torch): the key blocks padded to a power of two, as many query tiles
    a program (up to 16) as keep NKB·ROWS within 4096 scores, at least one; 8 warps above 2048 scores."""
    NKB = triton.next_power_of_2(nkb)
    rows = max(1, min(16, 4096 // NKB))
    return NKB, rows, 4 if NKB * rows <= 2048 else 8


def compile_select(fn, *, arch, block_m, block_n, nkb, causal, self_attn, by_ratio, sink=1, heads=None):
    """_sparse._select_kernel as _sparse.select launches it for `nkb` key blocks of block_n keys and query tiles of
    block_m rows (select_launch: NKB, ROWS, num_warps; Triton's default stages, no register cap): fp32 pooled scores,
    the int32 lut and counts; scale and share as fp32. Only the pointers are divisible by 16: the strides (multiples
    of nqb·nkb and of 2·nqb) and the token and block counts are as a shape gives them (the general case). `sink`
    (Sparsity's default 1, the only one callers pass) and `heads` (H, the heads of one chunk of scores: None for any
    count) compile as the constexpr Triton's launcher makes of an integer argument equal to 1."""
    NKB, rows, warps = select_launch(nkb)
    types_ = {"S": "*fp32", "LUT": "*i32", "CNT": "*i32", "scale": "fp32", "share": "fp32"}
    const = dict(BLOCK_M=block_m, BLOCK_N=block_n, NKB=NKB, ROWS=rows, CAUSAL=causal, SELF=self_attn,
                 BY_RATIO=by_ratio, **{name: 1 for name, n in (("sink", sink), ("H", heads)) if n == 1})
    return _compile(fn, arch, types_, const, _options(warps))


def compile_ws(fn, *, D, block_m, block_n, consumers, stages, maxnreg, consumer_regs, store_lse=False, pv16=False,
               causal=False, ctas=1):
    """_attention_ws._attn_ws_kernel (Gluon, sm90) as _attention_ws.attention launches it (pv16: 16-bit P·V on
    the user's v through a 4-D descriptor; ctas=2: clusters sharing K and V, Triton 3.9)."""
    import torch  # the descriptors' type strings come from Gluon's own descriptor class
    from triton.experimental.gluon import _runtime, language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    def desc(dtype, gdtype, block, split=False):
        t = torch.empty(block, dtype=dtype)
        cga = None if ctas == 1 else [[1 if split else 0] + [0] * (len(block) - 1)]  # rows split, or both CTAs
        lay = gl.NVMMASharedLayout.get_default_for(block, gdtype, **({"cga_layout": cga} if cga else {}))
        return mangle_type(TensorDescriptor(t, block, list(t.stride()), block, lay))

    v = desc(torch.float16, gl.float16, [1, 1, block_n, D]) if pv16 else desc(torch.float8_e4m3fn, gl.float8e4nv,
                                                                              [D, block_n])
    types_ = {"q_desc": desc(torch.int8, gl.int8, [block_m * ctas, D], split=True),
              "k_desc": desc(torch.int8, gl.int8, [block_n, D]), "v_desc": v, "O": "*fp16"}
    types_.update({k: "*fp32" for k in ("QS", "KS", "VS", "LSE")})
    const = dict(BLOCK_M=block_m, BLOCK_N=block_n, STORE_LSE=store_lse, CONSUMERS=consumers, STAGES=stages,
                 CONSUMER_REGS=consumer_regs, PV16=pv16, CAUSAL=causal, CTAS=ctas)
    options = {**_options(4, maxnreg=maxnreg), **({"num_ctas": ctas} if ctas > 1 else {})}
    return _compile(fn, 90, types_, const, options, source=_runtime.GluonASTSource)


def tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def ptxas(arch):
    """The ptxas Triton runs for compute capability `arch` (kernels/_compat.py's ptxas_path)."""
    return compat().ptxas_path(arch)


def ptxas_targets(arch):
    """The sm_ targets that ptxas accepts (its --help lists them), or None where it says nothing readable."""
    text = subprocess.run([ptxas(arch), "--help"], capture_output=True, text=True).stdout
    m = re.search(r"--gpu-name.*?Allowed values for this option:(.*?)\.\s*(?:Default|$)", text, re.S)
    return set(re.findall(r"'(sm_\w+)'", m.group(1))) if m else None


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
    ap.add_argument("--int8", action="store_true", help="INT8 P·V (pv='int8')")
    ap.add_argument("--pointer", action="store_true",
                    help="pointer loads instead of tensor descriptors (always, on a Triton without them)")
    ap.add_argument("--dump", help="write the SASS here")
    a = ap.parse_args(argv)

    k = compile_attention(kernel_module("_attention")._attn_kernel, arch=a.arch, D=a.dim, block_m=a.block_m,
                          block_n=a.block_n, fp8=not (a.fp16 or a.fine or a.int8), causal=a.causal, warps=a.warps,
                          stages=a.stages, maxnreg=a.maxnreg or None, k_token=a.fine, int8=a.int8,
                          tma=not a.pointer and compat().has_tensor_descriptors())
    text = cuobjdump(k, "--dump-sass")
    if a.dump:
        open(a.dump, "w").write(text)
    print("registers {regs}, stack {stack} B, shared {shared} B".format(**resources(k)))
    for ops in loops(text)[:2]:  # unmasked, masked
        print(f"loop of {sum(ops.values())} instructions: " + ", ".join(f"{o} {n}" for o, n in ops.most_common(14)))


if __name__ == "__main__":
    main()
