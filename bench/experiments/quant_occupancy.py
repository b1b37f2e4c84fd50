"""The quantization pass's register cap (bench/NOTES.md, v13): the block-Hadamard rotation takes the sm90 build
from 108 to 134 registers at hd128 (8 warps: one program an SM instead of two), counted offline. This times the
rotated pass (16-bit P·V's: no V quantization) and the whole `pv="auto"` call with and without a 128-register cap
on the pass (the arch table's quant_maxnreg), at the grid's shapes, checks that the capped pass writes the same
bytes, and records each build's registers and spills. On a GPU:
`OUT=dir python -m comfy_sage.bench.experiments.quant_occupancy`."""
import contextlib
import dataclasses
import json
import os

import torch
import triton
from triton.testing import do_bench

from ...kernels import _arch, _quant, sage_attention
from ..bench import tops
from ..clocks import Clocks
from .triton_split import builds

CAPS = (None, 128)


@contextlib.contextmanager
def capped(maxnreg):
    """The arch table's quantization register cap at head dim 128 set to `maxnreg` (None: no cap) for `auto`'s calls."""
    name = _arch.arch_of(torch.device("cuda")).name
    orig = _arch.ARCHES[name]
    _arch.ARCHES[name] = dataclasses.replace(orig, quant_maxnreg={128: maxnreg} if maxnreg else {})
    try:
        yield
    finally:
        _arch.ARCHES[name] = orig


def main():
    out = os.environ.get("OUT", ".")
    rows = []
    for D, H in ((128, 24), (64, 32)):
        for N in (8192, 16384, 32768):
            B = max(1, 16384 // N)
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn((B, H, N, D), device="cuda", generator=g, dtype=torch.float16) for _ in range(3))
            dims = (B, H, H, N, N, D, D)
            quant = dict(dims=dims, scale=D ** -0.5, block_m=64, block_n=128, fp8_v=False,
                         rot=_quant.rotation_width(D))
            ref = None
            for cap in CAPS:
                with capped(cap):
                    qz = _quant.quantize(q, k, v, maxnreg=cap, **quant)
                    got = [qz.q8, qz.qs, qz.k8, qz.ks, qz.kmean]
                    if ref is None:
                        ref = got
                    same = all(torch.equal(a, b) for a, b in zip(ref, got))
                    t_q = do_bench(lambda: _quant.quantize(q, k, v, maxnreg=cap, **quant), warmup=50, rep=300)
                    with Clocks(torch.cuda.current_device()) as clk:
                        t_all = do_bench(lambda: sage_attention(q, k, v, pv="auto"), warmup=100, rep=1000)
                r = dict(D=D, N=N, B=B, H=H, cap=cap, same_bytes=same, quant_ms=round(t_q, 4),
                         call_ms=round(t_all, 4), tops=round(tops(dict(B=B, H=H, N=N, D=D, causal=False), t_all), 1),
                         clocks=clk.summary())
                print(r, flush=True)
                rows.append(r)
    res = dict(triton=triton.__version__, torch=torch.__version__, device=torch.cuda.get_device_name(),
               rows=rows, builds=builds([("quant", _quant._quant_kernel)]))
    print(res["builds"], flush=True)
    with open(os.path.join(out, f"quant-occupancy-triton-{triton.__version__}.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
