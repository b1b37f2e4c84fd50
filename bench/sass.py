"""Compile the attention kernel for sm90 on a machine without a GPU and report what costs no device time.

`python bench/sass.py [--dim 128] [--block-n 128] [--stages 2] [--maxnreg 168] [--fp16 | --fine] [--causal]
[--dump FILE]`: registers, stack (spills), and the opcodes of the key-block loops (instructions per thread per
block). Needs only the `triton` package, the version the GPU runs (3.6 on the lent machine: its bundled ptxas and
cuobjdump); it loads kernels/_attention.py alone, so no torch either. bench/NOTES.md quotes these counts.
"""
import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget


def compile_sm90(fn, *, D, block_m, block_n, fp8, causal, warps, stages, maxnreg, k_token=False, extra=None):
    sig = {}
    dt = {"Q8": "i8", "K8": "i8", "V": "fp8e4nv" if fp8 else "fp16"}
    shapes = {"Q8": [1, block_m, D], "K8": [1, block_n, D], "V": [1, D, block_n] if fp8 else [1, 1, block_n, D]}
    for name in fn.arg_names:
        if name in shapes:
            sig[name] = f"tensordesc<{dt[name]}{shapes[name]}>"
        elif name in ("QS", "KS", "VS", "LSE"):
            sig[name] = "*fp32"
        elif name == "O":
            sig[name] = "*fp16"
        else:
            sig[name] = "i32"
    const = dict(D=D, DP=D, DS=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, PV_FP8=fp8, STORE_LSE=False,
                 P_SHIFT=8.806 if fp8 else 0.0, USE_TMA=True, K_TOKEN=k_token, **(extra or {}))
    for k in const:
        sig[k] = "constexpr"
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v
                                                                       for k, v in const.items()})
    opts = {"num_warps": warps, "num_stages": stages}
    if maxnreg:
        opts["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def cuobjdump(kernel, flag):
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


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
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block-m", type=int, default=64)
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--maxnreg", type=int, default=168)
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--fine", action="store_true")
    ap.add_argument("--dump", help="write the SASS here")
    a = ap.parse_args(argv)
    import importlib.util  # the kernel module alone: it imports triton only, so no torch is needed here

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "_attention.py")
    spec = importlib.util.spec_from_file_location("_attention", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _attn_kernel = mod._attn_kernel

    k = compile_sm90(_attn_kernel, D=a.dim, block_m=a.block_m, block_n=a.block_n, fp8=not (a.fp16 or a.fine),
                     causal=a.causal, warps=a.warps, stages=a.stages, maxnreg=a.maxnreg or None, k_token=a.fine)
    text = cuobjdump(k, "--dump-sass")
    if a.dump:
        open(a.dump, "w").write(text)
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", cuobjdump(k, "--dump-resource-usage"))
    print("registers {}, stack {} B, shared {} B".format(*usage.groups()))
    for ops in loops(text)[:2]:  # unmasked, masked
        print(f"loop of {sum(ops.values())} instructions: " + ", ".join(f"{o} {n}" for o, n in ops.most_common(14)))


if __name__ == "__main__":
    main()
