"""What diffusers' Wan attention spends on rotary embeddings at the Wan 720p shape (75,600 tokens, 40 heads of 128).

WanTransformer3DModel keeps its `rope` module in fp32 modules, so the rotary tables stay float64 on the GPU and the
rotation of q and k runs its products in float64 before the result is rounded to bf16. Timed per tensor: that
arithmetic, the same with float32 tables, and a plain copy of the tensor for scale.
`OUT=dir python bench/experiments/rope_cost.py` on a GPU.
"""
import json
import os

import torch
from triton.testing import do_bench

N, H, D = 75600, 40, 128


def rotate_pairs(x, cos_t, sin_t):
    """Interleaved pairs (x[2i], x[2i+1]) rotated by the tables' angles, computed in the tables' dtype."""
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
    ms = lambda fn: do_bench(fn, warmup=5, rep=200, return_mode="median")  # noqa: E731
    res = {"gpu": torch.cuda.get_device_name(),
           "diffusers_fp64_ms_per_tensor": ms(lambda: rotate_pairs(q, cos64, sin64)),
           "same_code_fp32_tables_ms_per_tensor": ms(lambda: rotate_pairs(q, cos32, sin32)),
           "copy_ms_per_tensor": ms(lambda: q.clone())}
    res["fp32_vs_fp64_bf16_elements_differing"] = (rotate_pairs(q, cos64, sin64)
                                                   != rotate_pairs(q, cos32, sin32)).float().mean().item()
    print(res)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "rope.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
