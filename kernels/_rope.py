"""Rotary embedding of interleaved pairs in one pass: what diffusers' Wan attention computes with torch ops.

diffusers' Wan rotates q and k as strided torch ops over the whole tensor (products with its float32 tables, a
difference, two strided writes, a cast): 6.1 ms per tensor at the Wan 720p shape on the H200, where one read and
one write of the tensor take 0.36 ms (bench/NOTES.md). Here each pair (x[2i], x[2i+1]) is one 32-bit word, rotated
in fp32 registers with the same products; rounded back to x's 16-bit dtype the result equals diffusers' but for
one unit in the last place in ~2e-5 of the elements (where the Triton compiler fuses a product into the
difference). fp32 tensors, and tensors where no Triton runs, take the same arithmetic in torch.
"""
import torch
import triton
import triton.language as tl

from ._arch import interpreting
from ._compat import launch_options
from ._ops import custom_op

BLOCK_T = 16  # tokens per program: their table rows are loaded once and serve every head
_DT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}  # the 16-bit dtypes the kernel rotates


@triton.jit
def _rotate_kernel(X, C, S, O, N, H, sxb, sxn, sxh, scb, DT: tl.constexpr, HALF: tl.constexpr,
                   HALF_P: tl.constexpr, BLOCK_T: tl.constexpr):
    # x and out as 32-bit words, one (x[2i], x[2i+1]) pair each: contiguous, vectorized loads and stores, and the
    # pair's members split by shifts instead of strided loads. C, S: [1 or B, N, HALF] fp32, the pair's cos and sin.
    b = tl.program_id(1).to(tl.int64)
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    i = tl.arange(0, HALF_P)
    ok = (t < N)[:, None] & (i < HALF)[None, :]
    tab = b * scb + t[:, None] * HALF + i[None, :]
    c = tl.load(C + tab, ok)
    s = tl.load(S + tab, ok)
    x_row = X + b * sxb + t[:, None] * sxn + i[None, :]
    o_row = O + ((b * N + t[:, None]) * H) * HALF + i[None, :]
    for h in range(H):
        w = tl.load(x_row + h * sxh, ok)
        x1 = w.to(tl.int16).to(DT, bitcast=True).to(tl.float32)  # the low half: x[2i]
        x2 = (w >> 16).to(tl.int16).to(DT, bitcast=True).to(tl.float32)
        lo = (x1 * c - x2 * s).to(DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        hi = (x1 * s + x2 * c).to(DT).to(tl.int16, bitcast=True).to(tl.int32) << 16
        tl.store(o_row + h * HALF, hi | lo, ok)


def _torch_rotate(x, c, s):
    """The same arithmetic in torch (fp32), where the Triton kernel does not run."""
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    c, s = c.float(), s.float()
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out


def can_rotate(x) -> bool:
    """Whether the Triton pass runs for this tensor: 16-bit, on a CUDA GPU or the interpreter on CPU."""
    return x.dtype in _DT and (x.device.type == "cuda" or (x.device.type == "cpu" and interpreting()))



def pair_tables(freqs_cos, freqs_sin):
    """diffusers' Wan tables ([1 or B, N, 1, D], each angle repeated for its pair) as the kernel reads them: the
    pair's cos (at its even channel, as diffusers reads it) and sin (at its odd one), [1 or B, N, D/2] fp32."""
    return (freqs_cos[..., 0, 0::2].float().contiguous(), freqs_sin[..., 0, 1::2].float().contiguous())


def rotate_pairs(x, freqs_cos, freqs_sin, tables=None):
    """x [B, N, H, D] rotated by diffusers' Wan tables `freqs_cos`, `freqs_sin` ([1 or B, N, 1, D]) as diffusers'
    WanAttnProcessor does. `tables`: pair_tables() of them, when one caller rotates several tensors. Returns a new
    contiguous tensor of x's dtype."""
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"rotate_pairs needs x as [B, N, H, D] with D even, got shape {tuple(x.shape)}")
    B, N, H, D = x.shape
    for name, f in (("freqs_cos", freqs_cos), ("freqs_sin", freqs_sin)):
        if f.dim() != 4 or f.shape[0] not in (1, B) or tuple(f.shape[1:]) != (N, 1, D):
            raise ValueError(f"{name} must be [1 or {B}, {N}, 1, {D}] for x of shape {tuple(x.shape)}, got "
                             f"{tuple(f.shape)}")
        if f.device != x.device:
            raise ValueError(f"{name} is on {f.device}, x on {x.device}")
    if not can_rotate(x):
        return _torch_rotate(x, freqs_cos[..., 0::2], freqs_sin[..., 1::2])
    c, s = tables if tables is not None else pair_tables(freqs_cos, freqs_sin)
    return _op(x, c.contiguous(), s.contiguous())


def _rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The custom op's implementation (an op, so that torch.compile keeps the launch whole)."""
    B, N, H, D = x.shape
    try:
        words = x.view(torch.int32)  # needs the last dim contiguous and pairs 4-byte aligned
    except RuntimeError:
        words = x.contiguous().view(torch.int32)
    out = torch.empty((B, N, H, D // 2), dtype=torch.int32, device=x.device)
    if interpreting():
        from ._interpret import patch_interpreter

        patch_interpreter()
    _rotate_kernel[(triton.cdiv(N, BLOCK_T), B)](
        words, c, s, out, N, H, words.stride(0), words.stride(1), words.stride(2), c.stride(0) if B > 1 and
        c.shape[0] > 1 else 0, DT=_DT[x.dtype], HALF=D // 2, HALF_P=triton.next_power_of_2(D // 2),
        BLOCK_T=BLOCK_T, num_warps=4, **launch_options())
    return out.view(x.dtype)


_op = custom_op("rotate_pairs", _rotate, lambda x, c, s: torch.empty(x.shape, dtype=x.dtype, device=x.device))
