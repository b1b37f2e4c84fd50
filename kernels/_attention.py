"""The attention kernel: INT8 Q·Kᵀ, exp2 online softmax, P·V in FP16/BF16 or FP8 with FP32 accumulation.

One source for causal and full attention, every head dim and both P·V types: the differences are constexpr.
Reads the padded tensors written by _quant.py (no masks on q/k loads), the user's v on the 16-bit path.
"""
import triton
import triton.language as tl

# FP8 path: P is scaled so its largest element is just under 448 (the e4m3 maximum), which keeps small
# probabilities out of the subnormal range; the scale cancels in acc / l and is removed from the LSE.
P_SHIFT_FP8 = 8.8060  # < log2(448)
LN2: tl.constexpr = 0.6931471805599453


@triton.jit
def _load(ptrs, mask, MASKED: tl.constexpr, other=0):
    """Masked load only where the tile can cross an edge (constexpr), so whole tiles load unmasked."""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=other)
    return tl.load(ptrs)


@triton.jit
def _blocks(acc, l_i, m_i, q8, qs, k_ptr, ks_ptr, v_ptr, vs_ptr, rows, d, lo, hi, Nk, svn,
            D: tl.constexpr, DP: tl.constexpr, DS: tl.constexpr, BLOCK_N: tl.constexpr, Nk_pad,
            CAUSAL: tl.constexpr, PV_FP8: tl.constexpr, MASKED: tl.constexpr, P_SHIFT: tl.constexpr):
    cols0 = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        cols = n0 + cols0
        k = _load(k_ptr + cols[:, None] * DS + d[None, :], d[None, :] < D, D != DP)
        s = tl.dot(q8, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
        c = qs * tl.load(ks_ptr + n0 // BLOCK_N)  # per-row scale: q scale (with sm_scale*log2e) times k block scale
        if MASKED:
            keep = cols[None, :] < Nk
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * c)
        p = tl.math.exp2(s * c[:, None] - (m_new - P_SHIFT)[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if PV_FP8:
            vt = _load(v_ptr + d[:, None] * Nk_pad + cols[None, :], d[:, None] < D, D != DP, 0.0)
            pv = tl.dot(p.to(tl.float8e4nv), tl.trans(vt), out_dtype=tl.float32)
            # Two-level accumulation: FP8 products summed over one block only, then added in FP32 with the
            # block's per-channel v scale (FP8 MMA accumulators keep fewer bits than FP32).
            vs = tl.load(vs_ptr + (n0 // BLOCK_N) * DP + d)
            acc = acc * alpha[:, None] + pv * vs[None, :]
        else:
            v = _load(v_ptr + cols[:, None].to(tl.int64) * svn + d[None, :], (cols[:, None] < Nk) & (d[None, :] < D),
                      MASKED or D != DP)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_kernel(Q8, QS, K8, KS, V, VS, O, LSE,
                 svb, svh, svn, sob, soh, son,
                 Hq, GROUP, Nq, Nk, Nq_pad, Nk_pad,
                 D: tl.constexpr, DP: tl.constexpr, DS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, PV_FP8: tl.constexpr, STORE_LSE: tl.constexpr, P_SHIFT: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    bhk = b * (Hq // GROUP) + h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, DP)

    q8 = _load(Q8 + (bh.to(tl.int64) * Nq_pad + rows[:, None]) * DS + d[None, :], d[None, :] < D, D != DP)
    qs = tl.load(QS + bh.to(tl.int64) * Nq_pad + rows)
    nkb = Nk_pad // BLOCK_N
    k_ptr = K8 + bhk.to(tl.int64) * Nk_pad * DS
    ks_ptr = KS + bhk.to(tl.int64) * nkb
    if PV_FP8:
        v_ptr = V + bhk.to(tl.int64) * D * Nk_pad
        vs_ptr = VS + bhk.to(tl.int64) * nkb * DP
    else:
        v_ptr = V + b.to(tl.int64) * svb + (h // GROUP).to(tl.int64) * svh
        vs_ptr = VS

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)

    # Blocks every row of this tile sees whole run unmasked; the diagonal (causal) and the tail block are masked.
    full_end = (Nk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(Nk, (pid_m + 1) * BLOCK_M)
        lo_mask = tl.minimum(full_end, (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N)
    else:
        hi = Nk
        lo_mask = full_end
    acc, l_i, m_i = _blocks(acc, l_i, m_i, q8, qs, k_ptr, ks_ptr, v_ptr, vs_ptr, rows, d, 0, lo_mask, Nk, svn,
                            D, DP, DS, BLOCK_N, Nk_pad, CAUSAL, PV_FP8, False, P_SHIFT)
    acc, l_i, m_i = _blocks(acc, l_i, m_i, q8, qs, k_ptr, ks_ptr, v_ptr, vs_ptr, rows, d, lo_mask, hi, Nk, svn,
                            D, DP, DS, BLOCK_N, Nk_pad, CAUSAL, PV_FP8, True, P_SHIFT)

    out = acc / l_i[:, None]
    row_ok = rows < Nq
    o_ptrs = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rows[:, None].to(tl.int64) * son + d[None, :]
    if D == DP:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (d[None, :] < D))
    if STORE_LSE:
        tl.store(LSE + bh.to(tl.int64) * Nq + rows, (m_i + tl.math.log2(l_i) - P_SHIFT) * LN2,
                 mask=row_ok)


def attention(qz, v, out, lse, *, dims, block_m, block_n, causal, fp8_v, num_warps, num_stages):
    """Launch over the tensors from _quant.quantize. `v` is the user's [B, Hkv, Nk, D] view on the 16-bit path;
    `out` a [B, Hq, Nq, D] view (any strides, last dim contiguous); `lse` [B, Hq, Nq] fp32 or None."""
    B, Hq, Hkv, Nq, Nk, D, DP = dims
    Nq_pad, Nk_pad = qz.q8.shape[2], qz.k8.shape[2]
    vt = qz.v8 if fp8_v else v
    grid = (Nq_pad // block_m, B * Hq)
    _attn_kernel[grid](
        qz.q8, qz.qs, qz.k8, qz.ks, vt, qz.vs if fp8_v else qz.ks, out, lse if lse is not None else qz.qs,
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        Hq, Hq // Hkv, Nq, Nk, Nq_pad, Nk_pad,
        D=D, DP=DP, DS=qz.q8.shape[3], BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, PV_FP8=fp8_v, STORE_LSE=lse is not None, P_SHIFT=P_SHIFT_FP8 if fp8_v else 0.0,
        num_warps=num_warps, num_stages=num_stages,
    )
