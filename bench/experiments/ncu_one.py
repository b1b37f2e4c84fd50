"""Two launches of the Triton kernel or the Gluon experiment (hd128, N=16384, H=24) for ncu.sh to profile the second."""
import sys
import torch
from comfy_sage.bench.experiments import gluon_sm90
from comfy_sage.kernels import _attention, _quant

B, H, N, D = 1, 24, 16384, 128
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(B, H, N, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
dims = (B, H, H, N, N, D, D)
qz = _quant.quantize(q, k, v, dims=dims, scale=D ** -0.5, block_m=64, block_n=128, fp8_v=True)
out = torch.empty_like(q)
for _ in range(2):
    if "triton" in sys.argv:
        _attention.attention(qz, v, out, None, dims=dims, block_m=64, block_n=128, causal=False, fp8_v=True,
                             num_warps=4, num_stages=2, tma=True, maxnreg=168)
    if "gluon" in sys.argv:
        gluon_sm90.attention(qz, out, None, dims=dims, block_m=64, block_n=128, causal=False)
torch.cuda.synchronize()
