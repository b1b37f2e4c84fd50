"""A/B timings behind the robustness changes of kernels v9.1, on the GPU, with cuDNN and the peers in the same
process: `OUT=dir python -m comfy_sage.bench.experiments.robustness_ab`.

- pointer_maxnreg: the sm90 tiles' register cap on the pointer path (what a Triton without tensor descriptors, or
  a head dim whose int8 rows are not 16-byte multiples, runs): capped as for the bulk-copy kernel, or uncapped.
- quant_warps: the quantization pass with 4 or 8 warps (8 from head dim 128: no spill).
- v_amax: the FP8 path's V channel maxima, our Triton pass against torch's aminmax (which allocated 4x v).
- hd256_ada: sm89/sm120's head-dim-256 FP8 tile, 64-key blocks (spilled there) against 32, timed here on sm90
  (the only card we have: it says what the change costs in instructions, not what it costs on an RTX 40xx).
- padded_dims: head dims whose int8 rows are padded to 16 bytes for the bulk-copy path (72 -> 80) or not (40),
  and 80, through sage_attention, with cuDNN and the peers.
Shapes: B=1, H=24, N=16384 (the grid's), fp16, full attention. SECTIONS=padded_dims (comma-separated) runs a
subset.
"""
import json
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from ...kernels import _arch, _attention, _quant, sage_attention
from ..bench import tops

B, H, N = 1, 24, 16384


def _ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _inputs(D, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(B, H, N, D, device="cuda", generator=g, dtype=torch.float16) for _ in range(3))


def _row(D, name, ms):
    return dict(D=D, variant=name, ms=round(ms, 4), tops=round(tops(dict(B=B, H=H, N=N, D=D, causal=False), ms), 1))


def baselines(D, q, k, v):
    rows = []
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        rows.append(_row(D, "sdpa_cudnn", _ms(lambda: F.scaled_dot_product_attention(q, k, v))))
    try:
        from sageattention import sageattn

        rows.append(_row(D, "sageattention2", _ms(lambda: sageattn(q, k, v, tensor_layout="HND"))))
    except (ImportError, ValueError) as e:
        rows.append(dict(D=D, variant="sageattention2", error=str(e)[:120]))
    try:
        from comfy_kitchen import int8_attention

        rows.append(_row(D, "comfy_kitchen_int8", _ms(lambda: int8_attention(q, k, v))))
    except ImportError as e:
        rows.append(dict(D=D, variant="comfy_kitchen_int8", error=str(e)[:120]))
    rows.append(_row(D, "ours_sage_attention", _ms(lambda: sage_attention(q, k, v))))
    return rows


def pointer_maxnreg(D, q, k, v):
    """The kernel alone on pre-quantized inputs, pointer loads, the sm90 FP8 and FP16 tiles' cap or none."""
    rows, DP = [], _arch.head_dim_bucket(D)
    for pv in ("fp8", "fp16"):
        t = _arch.ARCHES["sm90"].tiles[(DP, pv)]
        dims = (B, H, H, N, N, D, DP)
        qz = _quant.quantize(q, k, v, dims=dims, scale=D ** -0.5, block_m=t.block_m, block_n=t.block_n,
                             fp8_v=pv == "fp8")
        out = torch.empty_like(q)
        for cap in dict.fromkeys((t.maxnreg, None)):
            ms = _ms(lambda: _attention.attention(qz, v, out, None, dims=dims, block_m=t.block_m, block_n=t.block_n,
                                                  causal=False, fp8_v=pv == "fp8", num_warps=t.num_warps,
                                                  num_stages=t.num_stages, tma=False, maxnreg=cap))
            rows.append(_row(D, f"pointer_{pv}_maxnreg_{cap}", ms))
    return rows


def quant_warps(D, q, k, v, monkeypatch_warps):
    rows, DP = [], _arch.head_dim_bucket(D)
    dims = (B, H, H, N, N, D, DP)
    for w in (4, 8):
        monkeypatch_warps(w)
        ms = _ms(lambda: _quant.quantize(q, k, v, dims=dims, scale=D ** -0.5, block_m=64, block_n=128, fp8_v=True))
        rows.append(dict(D=D, variant=f"quant_fp8_warps_{w}", ms=round(ms, 4)))
    return rows


def v_amax(D, v):
    torch.cuda.synchronize()
    rows = []
    amax = torch.zeros(B, H, _arch.head_dim_bucket(D), device="cuda")
    blk = max(16, 4096 // amax.shape[-1])
    launch = lambda: _quant._v_amax_kernel[(-(-N // (blk * _quant.V_AMAX_BLOCKS)), B * H)](  # noqa: E731
        v, amax, v.stride(0), v.stride(1), v.stride(2), H, N, D=D, DP=amax.shape[-1], BLOCK_K=blk,
        BLOCKS=_quant.V_AMAX_BLOCKS, num_warps=4)
    rows.append(dict(D=D, variant="v_amax_triton", ms=round(_ms(launch), 4)))
    rows.append(dict(D=D, variant="v_amax_torch_aminmax", ms=round(_ms(lambda: torch.aminmax(v, dim=2)), 4)))
    return rows


def hd256_ada(q, k, v):
    rows = []
    for name, tile in (("hd256_fp8_ada_bn64", _arch.Tile(64, 64, 8, 2)), ("hd256_fp8_ada_bn32", _arch.Tile(64, 32, 8, 2))):
        from ...kernels import _api

        ms = _ms(lambda: _api._forward(q, k, v, "HND", False, None, "fp8", False, tile=tile))
        rows.append(_row(256, name, ms))
    return rows


def padded_dims():
    rows = []
    for D in (40, 72, 80):
        q, k, v = _inputs(D)
        rows += baselines(D, q, k, v)
        rows.append(_row(D, "ours_fp16pv", _ms(lambda: sage_attention(q, k, v, pv="fp16"))))
        rows.append(dict(D=D, variant="int8_row_bytes", value=_quant.row_bytes(D)))
        for r in rows[-6:]:
            print(r, flush=True)
    return rows


def main():
    out_dir = os.environ.get("OUT", ".")
    if os.environ.get("SECTIONS") == "padded_dims":
        rows = padded_dims()
        env = dict(torch=torch.__version__, gpu=torch.cuda.get_device_name(), shape=dict(B=B, H=H, N=N))
        with open(os.path.join(out_dir, "padded-dims.json"), "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)
        return
    real_warps = _quant.quant_warps
    rows = []
    for D in (40, 64, 72, 128):
        q, k, v = _inputs(D)
        rows += baselines(D, q, k, v) + pointer_maxnreg(D, q, k, v)
        rows += quant_warps(D, q, k, v, lambda w: setattr(_quant, "quant_warps", lambda dp: w))
        _quant.quant_warps = real_warps
        rows += v_amax(D, v)
        for r in rows[-8:]:
            print(r, flush=True)
    q, k, v = _inputs(256)
    rows += baselines(256, q, k, v) + hd256_ada(q, k, v)
    for r in rows[-5:]:
        print(r, flush=True)
    env = dict(torch=torch.__version__, gpu=torch.cuda.get_device_name(), shape=dict(B=B, H=H, N=N))
    path = os.path.join(out_dir, "robustness-ab.json")
    with open(path, "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
