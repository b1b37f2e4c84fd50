"""A pure-torch model of the kernels' arithmetic: the same blocks, scales, rounding and online softmax.

Tests run the Triton kernels (on CPU through TRITON_INTERPRET=1) against this model, and both against fp32
attention. Not used on the hot path.
"""
import math

import torch

from ._attention import P_SHIFT_FP8, P_SHIFT_INT8
from ._quant import FP8_MAX, LOG2E, SAMPLE, rotation_for


def _round_int8(x):
    return torch.trunc(x + torch.where(x >= 0, 0.5, -0.5)).to(torch.int8)


def rotate(x, w):
    """x [..., D] times the block-diagonal ±1 Hadamard matrix with w-wide blocks (unnormalized, as the kernel)."""
    h = torch.ones(1, 1)
    while h.shape[0] < w:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (x.unflatten(-1, (x.shape[-1] // w, w)) @ h).flatten(-2)


def quantize(q, k, v, *, scale, block_n, fp8_v, k_token=False, int8_v=False, rot=1):
    """q, k, v: [B, H, N, D]. Returns q8, qs [B,H,N], k8, ks [B,H,nb,4] (or [B,H,N] per token), kmean [B,H,D], v8
    (or None), vs ([B,H,D]; int8_v: [B,H,nb,D], per key block). rot > 1: q and k rotated first (kmean too)."""
    q32, k32, v32 = q.float(), k.float(), v.float()
    if rot > 1:
        q32, k32 = rotate(q32, rot), rotate(k32, rot)
    amax = q32.abs().amax(-1)
    s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q8 = _round_int8(q32 * (1.0 / s)[..., None])
    qs = s * (scale * LOG2E / rot)

    Nk = k.shape[2]
    idx = (torch.arange(SAMPLE) * Nk) // SAMPLE
    kmean = k32[:, :, idx].sum(2) / SAMPLE
    nb = -(-Nk // block_n)
    pad = nb * block_n - Nk
    kc = torch.nn.functional.pad(k32 - kmean[:, :, None], (0, 0, 0, pad))
    if k_token:  # one scale per token ([B, H, Nk])
        amax = kc[:, :, :Nk].abs().amax(-1)
        ks = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        k8 = _round_int8(kc[:, :, :Nk] * (1.0 / ks)[..., None])
    else:  # [B, H, nb, 4]: keys 8j + 2r + e of a block take scale r
        kb = kc.unflatten(2, (nb, block_n // 8, 4, 2))
        amax = kb.abs().amax((3, 5, 6))
        ks = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        k8 = _round_int8(kb * (1.0 / ks)[:, :, :, None, :, None, None]).flatten(2, 5)[:, :, :Nk]

    v8 = vs = None
    if int8_v:  # per key block and channel
        vb = torch.nn.functional.pad(v32, (0, 0, 0, pad)).unflatten(2, (nb, block_n))
        amax = vb.abs().amax(3)
        vs = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        vs = ((vs.view(torch.int32) + 0xFFFF) & -65536).view(torch.float32)  # rounded up to bfloat16, as stored
        v8 = _round_int8(vb * (1.0 / vs)[:, :, :, None]).flatten(2, 3)[:, :, :Nk]
    elif fp8_v:
        amax = v32.abs().amax(-2)
        vs = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        v8 = (v32 * (1.0 / vs)[..., None, :]).to(torch.float8_e4m3fn)
    return q8, qs, k8, ks, kmean, v8, vs


def attention(q, k, v, *, is_causal=False, scale=None, pv="fp16", block_n=64):
    """Model of sage_attention for HND inputs; returns (out in q's dtype, natural-log LSE fp32)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    fp8_v, int8_v, k_token = pv == "fp8", pv == "int8", pv in ("fine", "int8")
    rot = rotation_for(pv, D)
    q8, qs, k8, ks, kmean, v8, vs = quantize(q, k, v, scale=scale, block_n=block_n, fp8_v=fp8_v, k_token=k_token,
                                             int8_v=int8_v, rot=rot)
    g = Hq // Hkv
    k8, ks, kmean = (t.repeat_interleave(g, 1) for t in (k8, ks, kmean))
    if fp8_v or int8_v:
        v8, vs = v8.repeat_interleave(g, 1), vs.repeat_interleave(g, 1)
    vv = v.repeat_interleave(g, 1)
    pdtype = torch.bfloat16 if v.dtype in (torch.bfloat16, torch.float32) else torch.float16
    shift = P_SHIFT_FP8 if fp8_v else P_SHIFT_INT8 if int8_v else 0.0

    m = torch.full((B, Hq, Nq), float("-inf"))
    l = torch.zeros(B, Hq, Nq)
    acc = torch.zeros(B, Hq, Nq, D)
    rows = torch.arange(Nq)[:, None]
    for j, n0 in enumerate(range(0, Nk, block_n)):
        n1 = min(n0 + block_n, Nk)
        s = q8.float() @ k8[:, :, n0:n1].float().transpose(-1, -2)  # exact: |sum| < 127²·256 < 2^24
        if is_causal:
            s = s.masked_fill(torch.arange(n0, n1)[None, :] > rows, float("-inf"))
        if k_token:
            s, c = s * ks[:, :, None, n0:n1], qs[..., None]
        else:  # per (row, quad r): q's scale times the block's scale r
            c = (qs[..., None] * ks[:, :, j, None, :]).repeat_interleave(2, -1).repeat(1, 1, 1, block_n // 8)
            c = c[..., :n1 - n0]
        m_blk = (s * c).amax(-1)
        m_new = torch.maximum(m, m_blk)
        # INT8 P·V: P relative to the block's own row max (rows that see none of its keys: m_new, p = 0)
        m_ref = torch.where(m_blk > float("-inf"), m_blk, m_new) if int8_v else m_new
        p = torch.exp2(s * c - (m_ref - shift)[..., None])
        alpha = torch.exp2(m - m_new)
        if int8_v:  # round(p)·V8 in exact integers (what the int32 MMA sums), V's block scales, row sums of p
            beta = torch.exp2(m_ref - m_new)
            x = torch.round(p) @ v8[:, :, n0:n1].float()
            acc = acc * alpha[..., None] + x * (beta[..., None] * vs[:, :, j, None, :])
            l = l * alpha + beta * p.sum(-1)
        elif fp8_v:  # row sums of the FP8 P that multiplies v (the kernel sums it on the tensor cores)
            p = p.to(torch.float8_e4m3fn).float()
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ v8[:, :, n0:n1].float()
        else:
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p.to(pdtype).float() @ vv[:, :, n0:n1].to(pdtype).float()
        m = m_new
    if fp8_v:
        acc = acc * vs[:, :, None, :]
    out = (acc / l[..., None]).to(q.dtype)
    qr = rotate(q.float(), rot) if rot > 1 else q.float()
    lse = (m + torch.log2(l) - shift) * math.log(2) + (scale / rot) * torch.einsum("bhnd,bhd->bhn", qr, kmean)
    return out, lse
