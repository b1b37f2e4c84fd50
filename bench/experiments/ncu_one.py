"""Two launches of the Triton kernel or the Gluon experiment (hd128, N=16384, H=24) for ncu.sh to profile the
second: `python -m comfy_sage.bench.experiments.ncu_one triton|gluon`."""
import sys

import torch

from .exp_sm90 import run_gluon, run_triton, setup

if __name__ == "__main__":
    q, k, v, dims, qz = setup(1, 24, 16384, 128, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    for _ in range(2):
        if "triton" in sys.argv:
            run_triton(qz, v, out, None, dims, False)
        if "gluon" in sys.argv:
            run_gluon(qz, out, None, dims, False)
    torch.cuda.synchronize()
