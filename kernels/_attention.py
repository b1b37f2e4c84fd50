"""The attention kernel: INT8 Q·Kᵀ, exp2 online softmax, P·V in FP16/BF16 or FP8 with FP32 accumulation, or in
INT8 with int32 accumulation per key block.

One source for causal and full attention, every head dim, both P·V types and both ways of loading tiles: the
differences are constexpr. Reads the padded tensors written by _quant.py (no masks on q/k loads) and, on the
16-bit path, the user's v. With USE_TMA (sm90+, Triton 3.4+) tiles come through tensor descriptors (the bulk-copy
engine, which zero-fills past the head dim and the last token); otherwise through pointer loads.
"""
import triton
import triton.language as tl

# FP8 path: P is scaled so its largest element is just under 448 (the e4m3 maximum), which keeps small
# probabilities out of the subnormal range; the scale cancels in acc / l and is removed from the LSE.
P_SHIFT_FP8 = 8.8060  # < log2(448)
# INT8 path: P is unsigned, round(255 · exp2(score − the key block's row max)): every block keeps 8 bits, however
# far below the row's running max it sits (at the running max, blocks far below it kept a few levels: relative L1
# 0.061 against 0.024 on kbias, bench/NOTES.md v10 study). Its scale cancels in acc / l and leaves the LSE.
P_SHIFT_INT8 = 7.9943534  # log2(255)
LN2 = tl.constexpr(0.6931471805599453)
# int32 -> fp32 without the quarter-rate I2F instruction: for |s| < 2^22, the bits of 1.5·2^23 plus s read as the
# float 1.5·2^23 + s exactly (|Q·K| <= 127²·256 < 2^22), and the offset folds into the softmax FMA.
MAGIC_BITS = tl.constexpr(0x4B400000)
MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _load(ptrs, mask, MASKED: tl.constexpr, other=0):
    """Masked load only where the tile can cross an edge (constexpr), so whole tiles load unmasked."""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=other)
    return tl.load(ptrs)


@triton.jit
def _mma_a_order(p):
    """P's key columns in the order an 8-bit MMA reads its A operand from registers, so P goes from the Q·Kᵀ
    accumulator into the P·V MMA without shuffles between threads. Per 32 keys (bits h g r e of the key index:
    each thread holds keys 8g + 2r + e of its r), the A operand wants h r g e: swap g and r. v8 stores its
    keys in the same order (_quant.v_slot), so P·V sums the same products."""
    M: tl.constexpr = p.shape[0]
    N: tl.constexpr = p.shape[1]
    return p.reshape(M, N // 32, 2, 2, 4, 2).permute(0, 1, 2, 4, 3, 5).reshape(M, N)


@triton.jit
def _max_tree(x):
    """Max over axis 1 of [M, G, R] by halving G: log2(G) dependent steps instead of a G-long chain of dependent
    max instructions (the row max is the one serial stretch of the softmax)."""
    M: tl.constexpr = x.shape[0]
    R: tl.constexpr = x.shape[2]
    G: tl.constexpr = x.shape[1]
    tl.static_assert(G <= 256, "_max_tree unrolls at most 8 halvings")
    # A fixed unrolled bound and a compile-time `if` rather than static_range(log2(G)): a constexpr's log2 needs
    # triton.constexpr_function, which Triton 3.2-3.4 lack. The untaken steps emit nothing (same SASS, Triton 3.6).
    for i in tl.static_range(8):
        if (G >> i) > 1:
            x = tl.max(x.reshape(M, 2, G >> (i + 1), R), 1)
    return x.reshape(M, R)


@triton.jit
def _blocks(acc, l_i, m_i, ones, q8, qs, K8, ks_ptr, V, vs_ptr, vc_ptr, bhk, b, hk, rows, d, lo, hi, Nk, Nk_pad,
            svb, svh, svn, lut,
            D: tl.constexpr, DP: tl.constexpr, DS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            CAUSAL: tl.constexpr, PV_FP8: tl.constexpr, MASKED: tl.constexpr, P_SHIFT: tl.constexpr,
            USE_TMA: tl.constexpr, K_TOKEN: tl.constexpr, PV_INT8: tl.constexpr, SPARSE: tl.constexpr):
    """Key blocks [lo, hi) by token (dense), or entries [lo, hi) of this tile's list of key blocks (SPARSE)."""
    cols0 = tl.arange(0, BLOCK_N)
    STEP: tl.constexpr = 1 if SPARSE else BLOCK_N
    for it in range(lo, hi, STEP):
        if SPARSE:
            n0 = tl.load(lut + it) * BLOCK_N
        else:
            n0 = it
        n0 = tl.multiple_of(n0, BLOCK_N)
        cols = n0 + cols0
        if USE_TMA:
            k = K8.load([bhk, n0, 0]).reshape(BLOCK_N, DP)
        else:
            k = _load(K8 + (bhk.to(tl.int64) * Nk_pad + cols[:, None]) * DS + d[None, :], d[None, :] < D, D != DP)
        s = (tl.dot(q8, tl.trans(k), out_dtype=tl.int32) + MAGIC_BITS).to(tl.float32, bitcast=True)  # MAGIC + Q·K
        if MASKED:
            keep = cols[None, :] < Nk
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            s = tl.where(keep, s, float("-inf"))
        if K_TOKEN:  # a scale per key: the offset comes out first, then one multiply more per score
            s = (s - MAGIC) * tl.load(ks_ptr + cols)[None, :]
            c = qs
            if PV_INT8:  # P relative to this block's row max; a row that sees none of its keys takes m_new (p = 0)
                m_blk = tl.max(s, 1) * c
                m_new = tl.maximum(m_i, m_blk)
                m_ref = tl.where(m_blk > float("-inf"), m_blk, m_new)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1) * c)
                m_ref = m_new
            p = tl.math.exp2(s * c[:, None] - (m_ref - P_SHIFT)[:, None])
        else:
            # K has one scale per key block and lane quad (keys 8j + 2r + e share scale r): each thread of the MMA
            # layout holds one r, so its scale is one number per row, q's scale (with sm_scale*log2e) times k's.
            s = s.reshape(BLOCK_M, BLOCK_N // 8, 4, 2)
            c = qs[:, None] * tl.load(ks_ptr + (n0 // BLOCK_N) * 4 + tl.arange(0, 4))[None, :]
            m_new = tl.maximum(m_i, tl.max((_max_tree(tl.max(s, 3)) - MAGIC) * c, 1))
            off = m_new[:, None] + MAGIC * c - P_SHIFT
            p = tl.math.exp2(s * c[:, None, :, None] - off[:, None, :, None]).reshape(BLOCK_M, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_new)
        if PV_FP8 or PV_INT8:
            if USE_TMA:
                vt = V.load([bhk, 0, n0]).reshape(DP, BLOCK_N)
            else:
                vt = _load(V + (bhk.to(tl.int64) * D + d[:, None]) * Nk_pad + cols[None, :], d[:, None] < D, D != DP,
                           0.0)
        if PV_INT8:
            # round(p) − 128 as a signed byte: adding MAGIC − 128 rounds p to an integer (ulp 1 there, ties to
            # even) whose low byte is round(p) − 128. The MMA's initial value MAGIC_BITS + 128·colsum(V8) puts the
            # offset back: the int32 sum reads as the float MAGIC + Σ round(p)·V8, exact (|Σ| <= 255·127·128 < 2^22).
            p8 = _mma_a_order((p + (MAGIC - 128.0)).to(tl.int32, bitcast=True).to(tl.int8))
            blk = (n0 // BLOCK_N) * D + d
            init = (_load(vc_ptr + blk, d < D, D != DP).to(tl.int32) << 7) + MAGIC_BITS
            x = (tl.dot(p8, tl.trans(vt), out_dtype=tl.int32) + init[None, :]).to(tl.float32, bitcast=True) - MAGIC
            # the block's P·V and row sums (of the unrounded p) weigh exp2(m_ref − m_new); V's scales per channel
            beta = tl.math.exp2(m_ref - m_new)
            vs = _load(vs_ptr + blk, d < D, D != DP, 1.0).to(tl.float32)
            acc = acc * alpha[:, None] + x * (beta[:, None] * vs[None, :])
            l_i = l_i * alpha + beta * tl.sum(p, 1)
        elif PV_FP8:
            p = _mma_a_order(p.to(tl.float8e4nv))
            # Row sums on the tensor cores (P times a ones tile) instead of a row of adds per thread (measured
            # faster on this path only). Both sums are two-level: FP8 products summed over one block, then added
            # in FP32 (FP8 MMA accumulators keep fewer bits than FP32). v's per-channel scale comes after the loop.
            acc = acc * alpha[:, None] + tl.dot(p, tl.trans(vt), out_dtype=tl.float32)
            l_i = l_i * alpha[:, None] + tl.dot(p, ones, out_dtype=tl.float32)
        else:
            if USE_TMA:
                v = V.load([b, hk, n0, 0]).reshape(BLOCK_N, DP)
            else:
                v = _load(V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh + cols[:, None].to(tl.int64) * svn
                          + d[None, :], (cols[:, None] < Nk) & (d[None, :] < D), MASKED or D != DP)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_kernel(Q8, QS, K8, KS, V, VS, VC, O, LSE, LUT, CNT,
                 svb, svh, svn, sob, soh, son,
                 Hq, GROUP, Nq, Nk, Nq_pad, Nk_pad, KMAX,
                 D: tl.constexpr, DP: tl.constexpr, DS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, PV_FP8: tl.constexpr, STORE_LSE: tl.constexpr, P_SHIFT: tl.constexpr,
                 USE_TMA: tl.constexpr, K_TOKEN: tl.constexpr, PV_INT8: tl.constexpr, SPARSE: tl.constexpr):
    tl.static_assert(DP <= 256)  # keeps |Q·K| < 2^22 for the MAGIC conversion
    tl.static_assert(not PV_INT8 or (K_TOKEN and BLOCK_N <= 128))  # ... and |P·V8| (per key block) too
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    bhk = b * (Hq // GROUP) + hk
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, DP)

    if USE_TMA:
        q8 = Q8.load([bh, pid_m * BLOCK_M, 0]).reshape(BLOCK_M, DP)
    else:
        q8 = _load(Q8 + (bh.to(tl.int64) * Nq_pad + rows[:, None]) * DS + d[None, :], d[None, :] < D, D != DP)
    qs = tl.load(QS + bh.to(tl.int64) * Nq_pad + rows)
    nkb = Nk_pad // BLOCK_N
    ks_ptr = KS + bhk.to(tl.int64) * (Nk_pad if K_TOKEN else nkb * 4)
    vs_ptr = VS + bhk.to(tl.int64) * nkb * D  # INT8 path: V's scales and column sums per key block and channel
    vc_ptr = VC + bhk.to(tl.int64) * nkb * D

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    if PV_FP8:
        ones = tl.trans(tl.full([16, BLOCK_N], 1.0, tl.float32).to(tl.float8e4nv))
        l_i = tl.zeros([BLOCK_M, 16], tl.float32)  # 16 equal columns: P times ones
    else:
        ones = 0
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)

    # Blocks every row of this tile sees whole run unmasked; the diagonal (causal) and the tail block are masked.
    # SPARSE: this tile's ascending list of key blocks (_sparse.py), its first CNT[0] entries unmasked.
    lut = LUT + (bh.to(tl.int64) * (Nq_pad // BLOCK_M) + pid_m) * KMAX
    if SPARSE:
        cnt = CNT + (bh.to(tl.int64) * (Nq_pad // BLOCK_M) + pid_m) * 2
        lo_mask = tl.load(cnt)
        hi = tl.load(cnt + 1)
    else:
        full_end = (Nk // BLOCK_N) * BLOCK_N
        if CAUSAL:
            hi = tl.minimum(Nk, (pid_m + 1) * BLOCK_M)
            lo_mask = tl.minimum(full_end, (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N)
        else:
            hi = Nk
            lo_mask = full_end
    acc, l_i, m_i = _blocks(acc, l_i, m_i, ones, q8, qs, K8, ks_ptr, V, vs_ptr, vc_ptr, bhk, b, hk, rows, d, 0,
                            lo_mask, Nk, Nk_pad, svb, svh, svn, lut, D, DP, DS, BLOCK_M, BLOCK_N, CAUSAL, PV_FP8,
                            False, P_SHIFT, USE_TMA, K_TOKEN, PV_INT8, SPARSE)
    acc, l_i, m_i = _blocks(acc, l_i, m_i, ones, q8, qs, K8, ks_ptr, V, vs_ptr, vc_ptr, bhk, b, hk, rows, d, lo_mask,
                            hi, Nk, Nk_pad, svb, svh, svn, lut, D, DP, DS, BLOCK_M, BLOCK_N, CAUSAL, PV_FP8, True,
                            P_SHIFT, USE_TMA, K_TOKEN, PV_INT8, SPARSE)

    if PV_FP8:
        l_i = tl.max(l_i, 1)
    out = acc / l_i[:, None]
    if PV_FP8:
        out = out * tl.load(VS + bhk.to(tl.int64) * DP + d)[None, :]
    row_ok = rows < Nq
    o_ptrs = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rows[:, None].to(tl.int64) * son + d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (d[None, :] < D))
    if STORE_LSE:
        # the quantization pass left scale·q·m there (the part K's smoothing took out of every score)
        lse_ptrs = LSE + bh.to(tl.int64) * Nq + rows
        tl.store(lse_ptrs, tl.load(lse_ptrs, mask=row_ok) + (m_i + tl.math.log2(l_i) - P_SHIFT) * LN2, mask=row_ok)


def _descriptors(qz, v, dims, block_m, block_n, v8):
    """Tensor descriptors for the bulk-copy path, or None where a tensor's strides do not allow it."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from ._arch import bulk_copyable

    B, Hq, Hkv, Nq, Nk, D, DP = dims
    q8, k8 = qz.q8, qz.k8
    if q8.shape[3] % 16:
        return None  # rows of D % 16 != 0 bytes: the bulk-copy engine needs 16-byte strides
    dq = TensorDescriptor(q8, [B * Hq, q8.shape[2], D], [q8.shape[2] * q8.shape[3], q8.shape[3], 1], [1, block_m, DP])
    dk = TensorDescriptor(k8, [B * Hkv, k8.shape[2], D], [k8.shape[2] * k8.shape[3], k8.shape[3], 1], [1, block_n, DP])
    if v8:  # 8-bit v, transposed
        v8 = qz.v8
        dv = TensorDescriptor(v8, [B * Hkv, D, v8.shape[3]], [D * v8.shape[3], v8.shape[3], 1], [1, DP, block_n])
    else:
        if not bulk_copyable(v):
            return None
        dv = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, block_n, DP])
    return dq, dk, dv


def attention(qz, v, out, lse, *, dims, block_m, block_n, causal, fp8_v, num_warps, num_stages, tma=False,
              maxnreg=None, k_token=False, pointer_maxnreg=None, int8_v=False, sparse=None):
    """Launch over the tensors from _quant.quantize. `v` is the user's [B, Hkv, Nk, D] view on the 16-bit path;
    `out` a [B, Hq, Nq, D] view (any strides, last dim contiguous); `lse` [B, Hq, Nq] fp32 or None. `sparse`:
    (lut [B·Hq, query tiles, KMAX] int32 key blocks ascending, counts [B·Hq, query tiles, 2] int32: unmasked, all),
    from _sparse.select, for these block sizes."""
    B, Hq, Hkv, Nq, Nk, D, DP = dims
    Nq_pad, Nk_pad = qz.q8.shape[2], qz.k8.shape[2]
    from ._compat import has_tensor_descriptors, launch_options  # here: bench/sass.py loads this module alone

    # tma on a Triton without tensor descriptors (before 3.4), or rows the bulk-copy engine cannot take: the same
    # tile through pointer loads, with the tile's cap for that path (_arch.Tile.pointer_maxnreg)
    v8 = fp8_v or int8_v
    srcs = _descriptors(qz, v, dims, block_m, block_n, v8) if tma and has_tensor_descriptors() else None
    if srcs is None:
        srcs = (qz.q8, qz.k8, qz.v8 if v8 else v)
        maxnreg = pointer_maxnreg if tma else maxnreg
    grid = (Nq_pad // block_m, B * Hq)
    _attn_kernel[grid](
        srcs[0], qz.qs, srcs[1], qz.ks, srcs[2], qz.vs if v8 else qz.ks, qz.vc if int8_v else qz.ks, out,
        lse if lse is not None else qz.qs, *(sparse or (qz.qs, qz.qs)),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        Hq, Hq // Hkv, Nq, Nk, Nq_pad, Nk_pad, sparse[0].shape[-1] if sparse else 0,
        D=D, DP=DP, DS=qz.q8.shape[3], BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, PV_FP8=fp8_v, STORE_LSE=lse is not None,
        P_SHIFT=P_SHIFT_FP8 if fp8_v else P_SHIFT_INT8 if int8_v else 0.0,
        USE_TMA=not isinstance(srcs[0], type(qz.q8)), K_TOKEN=k_token, PV_INT8=int8_v, SPARSE=sparse is not None,
        num_warps=num_warps, num_stages=num_stages, **launch_options(maxnreg),
    )
