"""What diffusers' Wan attention spends on rotary embeddings at the Wan 720p shape (75,600 tokens, 40 heads of 128),
and what our one-pass rotation (kernels/_rope.py) spends instead.

diffusers' WanRotaryPosEmbed builds float32 tables (get_1d_rotary_pos_embed returns `.float()`); its processor
rotates q and k with strided torch ops. Timed per tensor: that code with float32 tables (what diffusers runs) and
with float64 tables (for scale), our kernel, a plain copy of the tensor, and the RMSNorm over all heads that comes
right before the rotation. `OUT=dir python -m comfy_sage.bench.experiments.rope_cost` on a GPU.
"""
import json
import os

import torch
from triton.testing import do_bench

from ...kernels._rope import rotate_pairs as one_pass

N, H, D = 75600, 40, 128


def rotate_pairs(x, cos_t, sin_t):
    """Interleaved pairs (x[2i], x[2i+1]) rotated by the tables' angles, computed in the tables' dtype, as diffusers'
    WanAttnProcessor does."""
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos_t[..., 0::2], sin_t[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * c - odd * s
    out[..., 1::2] = even * s + odd * c
    return out


def main():
    q = torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16)
    angle = torch.rand(1, N, 1, D // 2, device="cuda", dtype=torch.float64) * 6.28
    cos64, sin64 = torch.cos(angle).repeat_interleave(2, -1), torch.sin(angle).repeat_interleave(2, -1)
    cos32, sin32 = cos64.float(), sin64.float()
    norm = torch.nn.RMSNorm(H * D, eps=1e-6, device="cuda", dtype=torch.bfloat16)
    flat = q.flatten(2)
    ms = lambda fn: do_bench(fn, warmup=5, rep=200, return_mode="median")  # noqa: E731
    ref = rotate_pairs(q, cos32, sin32)
    ours = one_pass(q, cos32, sin32)
    res = {"gpu": torch.cuda.get_device_name(), "shape": [1, N, H, D],
           "diffusers_fp32_tables_ms_per_tensor": ms(lambda: rotate_pairs(q, cos32, sin32)),
           "same_code_fp64_tables_ms_per_tensor": ms(lambda: rotate_pairs(q, cos64, sin64)),
           "one_pass_ms_per_tensor": ms(lambda: one_pass(q, cos32, sin32)),
           "copy_ms_per_tensor": ms(lambda: q.clone()),
           "rmsnorm_all_heads_ms_per_tensor": ms(lambda: norm(flat)),
           "one_pass_vs_diffusers_bf16_elements_differing": (ours != ref).float().mean().item(),
           "fp32_vs_fp64_bf16_elements_differing": (rotate_pairs(q, cos64, sin64) != ref).float().mean().item()}
    print(res)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "rope.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
