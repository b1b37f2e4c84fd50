"""Experiment (not used by the package): the sm90 FP8 path in Gluon, Triton's explicit dialect, to overlap
Q·Kᵀ with the softmax inside one warpgroup (FlashAttention-3's in-warpgroup pipelining), which Triton's own
pipeliner does not do for this loop: it keeps an MMA in flight across iterations only with an fp32 accumulator,
and Q·Kᵀ accumulates in int32.

Same arithmetic as kernels/_attention.py on the same quantized inputs (MAGIC conversion, K scales per block and
lane quad, P shifted to 448, v8's key order), except that the row sums add P in FP32 (FADD) instead of P times a
ones tile: the ones tile in shared memory gave wrong sums here (not resolved). AHEAD=True issues block j+1's
Q·Kᵀ before block j's softmax (two Q·Kᵀ accumulators live: 255 registers, two CTAs per SM); AHEAD=False is the
serial order. Measured on the H200 against kernels/_attention.py in the same run (bench/NOTES.md, v8): slower,
731-760 against 800-836 TOPS. Run it with bench/experiments/exp_sm90.py on a GPU.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_wait

from ...kernels._attention import LN2, MAGIC, MAGIC_BITS, P_SHIFT_FP8, _max_tree, _mma_a_order
from ...kernels._attention_ws import _descriptors, a_operand_layout, mma_layout, quad_rows


@gluon.jit
def _load(desc, smem, bar, row, col, j, pred, STAGES: gl.constexpr):
    """Bulk copy of block j into its stage of a ring, completing on that stage's barrier."""
    s = j % STAGES
    mbarrier.expect(bar.index(s), desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(desc, [row, col], bar.index(s), smem.index(s), pred=pred)


@gluon.jit
def _step(j, s_tok, m_i, l_i, acc, ks, zero_s, o_zero, qs, ks_ptr, rows, cols0, q_smem, k_smem, v_smem, k_bar, v_bar,
          k_desc, v_desc, k_row, v_row, n_blocks, Nk, MASKED: gl.constexpr,
          BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, P_SHIFT: gl.constexpr,
          K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, p_layout: gl.constexpr, o_layout: gl.constexpr,
          AHEAD: gl.constexpr):
    """Key block j: its softmax and P·V; with AHEAD, block j+1's Q·Kᵀ is issued first to run beside them."""
    if AHEAD:
        s = warpgroup_mma_wait(0, deps=(s_tok, ))
        # block j+1's Q·Kᵀ goes to the tensor cores now and overlaps this block's softmax
        nst = (j + 1) % K_STAGES
        mbarrier.wait(k_bar.index(nst), ((j + 1) // K_STAGES) & 1)
        s_tok = warpgroup_mma(q_smem, k_smem.index(nst).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    else:
        mbarrier.wait(k_bar.index(j % K_STAGES), (j // K_STAGES) & 1)
        s = warpgroup_mma(q_smem, k_smem.index(j % K_STAGES).permute((1, 0)), zero_s, use_acc=False)

    s = (s + MAGIC_BITS).to(gl.float32, bitcast=True)  # MAGIC + Q·K
    if MASKED:
        cols = j * BLOCK_N + cols0
        keep = cols[None, :] < Nk
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        s = gl.where(keep, s, float("-inf"))
    s = s.reshape([BLOCK_M, BLOCK_N // 8, 4, 2])
    c = qs[:, None] * ks[None, :]
    ks = gl.load(ks_ptr + gl.minimum(j + 1, n_blocks - 1) * 4)  # next block's, a block ahead of its use
    mx = gl.convert_layout(_max_tree(gl.max(s, 3)), c.type.layout, assert_trivial=True)
    m_new = gl.maximum(m_i, gl.max((mx - MAGIC) * c, 1))
    off = m_new[:, None] + MAGIC * c - P_SHIFT
    p = gl.exp2(s * c[:, None, :, None] - off[:, None, :, None]).reshape([BLOCK_M, BLOCK_N])
    alpha = gl.exp2(m_i - m_new)
    m_i = m_new
    p8 = _mma_a_order(p.to(gl.float8e4nv))

    vst = j % V_STAGES
    mbarrier.wait(v_bar.index(vst), (j // V_STAGES) & 1)
    pv_tok = warpgroup_mma(gl.convert_layout(p8, p_layout, assert_trivial=True),
                           v_smem.index(vst).permute((1, 0)), o_zero, use_acc=False, is_async=True)
    psum = gl.convert_layout(gl.sum(p, 1), alpha.type.layout)
    # (with AHEAD this waits for block j+1's Q·Kᵀ too); FP8 products of one block, added in FP32
    pv = warpgroup_mma_wait(0, deps=(pv_tok, ))
    l_i = l_i * alpha + psum
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None] + pv
    # every warp is past the MMAs that read K block j (and j+1) and V block j: refill the stages of block j
    gl.thread_barrier()
    jk = j + K_STAGES
    _load(k_desc, k_smem, k_bar, k_row + jk * BLOCK_N, 0, jk, jk <= n_blocks, K_STAGES)
    jv = j + V_STAGES
    _load(v_desc, v_smem, v_bar, v_row, jv * BLOCK_N, jv, jv < n_blocks, V_STAGES)
    return s_tok, m_i, l_i, acc, ks


@gluon.jit
def _attn_sm90(q_desc, k_desc, v_desc, QS, KS, VS, O, LSE, sob, soh, son,
               Hq, GROUP, Nq, Nk, Nq_pad, Nk_pad,
               D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
               STORE_LSE: gl.constexpr, P_SHIFT: gl.constexpr, K_STAGES: gl.constexpr,
               V_STAGES: gl.constexpr, AHEAD: gl.constexpr = True):
    gl.static_assert(D <= 256)  # keeps |Q·K| < 2^22 for the MAGIC conversion
    s_layout: gl.constexpr = mma_layout(BLOCK_N)
    o_layout: gl.constexpr = mma_layout(D)
    p_layout: gl.constexpr = a_operand_layout(o_layout)
    r_layout: gl.constexpr = quad_rows(BLOCK_M, BLOCK_N).type.layout
    row_layout: gl.constexpr = gl.SliceLayout(1, r_layout)

    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    bhk = b * (Hq // GROUP) + hk
    if CAUSAL:
        hi = gl.minimum(Nk, (pid_m + 1) * BLOCK_M)
    else:
        hi = Nk
    n_blocks = (hi + BLOCK_N - 1) // BLOCK_N
    mask_from = (Nk // BLOCK_N) * BLOCK_N  # blocks from here on see the sequence end (or, causal, the diagonal)
    if CAUSAL:
        mask_from = gl.minimum(mask_from, (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N)

    q_smem = gl.allocate_shared_memory(gl.int8, [BLOCK_M, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(gl.int8, [K_STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.float8e4nv, [V_STAGES, D, BLOCK_N], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(K_STAGES):
        mbarrier.init(k_bar.index(i), count=1)
    for i in gl.static_range(V_STAGES):
        mbarrier.init(v_bar.index(i), count=1)

    k_row = bhk * Nk_pad
    v_row = bhk * D
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [bh * Nq_pad + pid_m * BLOCK_M, 0], q_bar, q_smem)
    # K runs one block ahead of V: the loop's Q·Kᵀ is for the block after the one whose P·V it does, so K's
    # ring is one stage deeper. Block n_blocks is loaded and multiplied too (one spare MMA per tile): the loop
    # has no branch around its MMAs.
    for i in gl.static_range(K_STAGES):
        _load(k_desc, k_smem, k_bar, k_row + i * BLOCK_N, 0, i, i <= n_blocks, K_STAGES)
    for i in gl.static_range(V_STAGES):
        _load(v_desc, v_smem, v_bar, v_row, i * BLOCK_N, i, i < n_blocks, V_STAGES)

    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, gl.SliceLayout(1, s_layout))
    cols0 = gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
    qs = gl.load(QS + bh.to(gl.int64) * Nq_pad + pid_m * BLOCK_M + gl.arange(0, BLOCK_M, row_layout))
    ks_ptr = KS + bhk.to(gl.int64) * (Nk_pad // BLOCK_N * 4) + gl.arange(0, 4, gl.SliceLayout(0, r_layout))
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_layout)
    l_i = gl.zeros([BLOCK_M], gl.float32, row_layout)
    o_zero = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    acc = o_zero

    ks = gl.load(ks_ptr)
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bar.index(0), 0)
    if AHEAD:
        s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    else:
        s_tok = zero_s
    # blocks every row of this tile sees whole run unmasked; the diagonal (causal) and the last block masked
    st = (s_tok, m_i, l_i, acc, ks)
    for j in range(0, mask_from // BLOCK_N):
        st = _step(j, *st, zero_s, o_zero, qs, ks_ptr, rows, cols0, q_smem, k_smem, v_smem, k_bar, v_bar,
                   k_desc, v_desc, k_row, v_row, n_blocks, Nk, False, BLOCK_M, BLOCK_N, CAUSAL, P_SHIFT,
                   K_STAGES, V_STAGES, p_layout, o_layout, AHEAD)
    for j in range(mask_from // BLOCK_N, n_blocks):
        st = _step(j, *st, zero_s, o_zero, qs, ks_ptr, rows, cols0, q_smem, k_smem, v_smem, k_bar, v_bar,
                   k_desc, v_desc, k_row, v_row, n_blocks, Nk, True, BLOCK_M, BLOCK_N, CAUSAL, P_SHIFT,
                   K_STAGES, V_STAGES, p_layout, o_layout, AHEAD)
    s_tok, m_i, l_i, acc, ks = st
    warpgroup_mma_wait(0, deps=(s_tok, ))  # the spare block's Q·Kᵀ

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(K_STAGES):
        mbarrier.invalidate(k_bar.index(i))
    for i in gl.static_range(V_STAGES):
        mbarrier.invalidate(v_bar.index(i))

    l_row = l_i
    out = acc / gl.convert_layout(l_row, gl.SliceLayout(1, o_layout))[:, None]
    d = gl.arange(0, D, gl.SliceLayout(0, o_layout))
    out = out * gl.load(VS + bhk.to(gl.int64) * D + d)[None, :]
    orows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, gl.SliceLayout(1, o_layout))
    o_ptrs = O + b.to(gl.int64) * sob + h.to(gl.int64) * soh + orows[:, None].to(gl.int64) * son + d[None, :]
    gl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(orows < Nq)[:, None])
    if STORE_LSE:
        lrows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, row_layout)
        lse = (m_i + gl.log2(gl.convert_layout(l_row, row_layout)) - P_SHIFT) * LN2
        gl.store(LSE + bh.to(gl.int64) * Nq + lrows, lse, mask=lrows < Nq)


def attention(qz, out, lse, *, dims, block_m, block_n, causal, num_warps=4, k_stages=3, v_stages=2, maxnreg=None,
              ahead=True):
    """Launch over the tensors from kernels._quant.quantize (fp8_v=True, head dim 64 or 128, unpadded); `out` a
    [B, Hq, Nq, D] view (last dim contiguous), `lse` [B, Hq, Nq] fp32 or None."""
    B, Hq, Hkv, Nq, Nk, D, DP = dims
    Nq_pad, Nk_pad = qz.q8.shape[2], qz.k8.shape[2]
    dq, dk, dv = _descriptors(qz, dims, block_m, block_n)
    grid = (Nq_pad // block_m, B * Hq)
    _attn_sm90[grid](
        dq, dk, dv, qz.qs, qz.ks, qz.vs, out, lse if lse is not None else qz.qs,
        out.stride(0), out.stride(1), out.stride(2),
        Hq, Hq // Hkv, Nq, Nk, Nq_pad, Nk_pad,
        D=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, STORE_LSE=lse is not None, P_SHIFT=P_SHIFT_FP8,
        K_STAGES=k_stages, V_STAGES=v_stages, AHEAD=ahead, num_warps=num_warps,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )
