"""Two launches of the Triton kernel or the Gluon experiment (hd128, N=16384, H=24) for ncu.sh to profile the
second: `python -m comfy_sage.bench.experiments.ncu_one triton|gluon|ws16` (ws16: the shipped warp-specialized
kernel with FP16 P·V, through sage_attention)."""
import sys

import torch

from ...kernels import sage_attention
from .exp_sm90 import run_gluon, run_triton, setup

if __name__ == "__main__":
    q, k, v, dims, qz = setup(1, 24, 16384, 128, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    for _ in range(2):
        if "triton" in sys.argv:
            run_triton(qz, v, out, None, dims, False)
        if "gluon" in sys.argv:
            run_gluon(qz, out, None, dims, False)
        if "ws16" in sys.argv:
            sage_attention(q, k, v, pv="fp16")
    torch.cuda.synchronize()
