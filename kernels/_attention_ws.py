"""sm90 attention (full or causal) with FP8 or 16-bit P·V in Gluon (Triton's explicit dialect), warp-specialized as
FlashAttention-3 is.

Same arithmetic as _attention.py on the same quantized inputs (the MAGIC int->float conversion, K scales per key
block and lane quad; FP8: P shifted to 448 and v8's key order; 16-bit: P in v's dtype, the user's v read through a
4-D descriptor), with another structure:
- one producer warp issues the bulk copies: each consumer's Q tile once, then K and V of each key block into a
  ring of shared-memory stages, waiting on a stage's "empty" mbarrier before refilling it and signalling its
  "ready" mbarrier with the bytes to expect;
- CONSUMERS warpgroups of 4 warps, 64 query rows each, wait on "ready", run Q·Kᵀ, the softmax and P·V, and arrive
  on "empty" once the MMA that read the stage has completed.
The consumers issue no copies, so nothing in their key loop is a CTA-wide barrier: Triton's own pipeliner puts
three `bar.sync` per key block in _attention.py's loop (19% of a warp's cycles, bench/NOTES.md); here Triton
keeps one warpgroup-wide barrier before each mbarrier wait and arrive (two per block). Row sums add P in FP32:
the ones-tile MMA of _attention.py gave wrong sums in Gluon.

Causal: each warpgroup stops at the key block holding its last row's key (only that block and the tail are
masked) and releases the blocks it does not need as they arrive, so that the ring's count stays the same; the
longest tiles run first.

Used where the sm90 table gives a tile `ws` (FP8 or FP16 P·V, head dim exactly 64 or 128, bulk
copies, a 16-bit v with 16-byte aligned rows) and the installed Triton is one this was measured with on a GPU
(TESTED_TRITON: 3.6 and 3.9); everything else runs _attention.py. It also compiles with Triton 3.7 and 3.8
(COMPILES_ON, the offline arch check), where COMFY_SAGE_WS=1 runs it. Triton's CPU interpreter does not run Gluon:
tests/test_kernels_gpu.py checks it against _attention.py on the GPU.
"""
import functools
import inspect
import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from ._arch import bulk_copyable
from ._attention import LN2, MAGIC, MAGIC_BITS, P_SHIFT_FP8, _max_tree, _mma_a_order
from ._compat import launch_options

# the bulk copy global -> shared, same arguments: `async_load` from Triton 3.7 (3.9 removed the older name)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
# barriers of a CTA cluster (Triton 3.9's Gluon; Triton reads every global a kernel names, taken branch or not)
_allocate_mbarrier = getattr(mbarrier, "allocate_mbarrier", None)
# clusters of two CTAs sharing K and V (one multicast bulk copy for both): Triton 3.9's Gluon, not 3.6's
MULTICAST = _allocate_mbarrier is not None and "multicast" in inspect.signature(_tma_load).parameters

FP8_SHIFT = gl.constexpr(P_SHIFT_FP8)

PRODUCER_REGS = gl.constexpr(24)  # the least setmaxnreg allows: the producer holds only scalars
TESTED_TRITON = ("3.6.", "3.9.")  # run on a GPU against _attention.py: used by default only on these
# Gluon's API moves between releases: the Tritons this source compiles with (the offline arch check, sm90), where
# COMFY_SAGE_WS=1 may run it; others run _attention.py
COMPILES_ON = ("3.6.", "3.7.", "3.8.", "3.9.")
ENV = "COMFY_SAGE_WS"      # "0": never use this kernel (A/B runs, a way out); "1": also on untested Triton


@triton.constexpr_function
def mma_layout(n, k=32, ctas=1):
    """The register layout of one warpgroup's wgmma accumulator, n columns wide (k: the instruction's depth, 32
    for 8-bit operands, 16 for 16-bit ones); ctas=2: a cluster's rows, split in halves between its two CTAs."""
    if ctas == 1:
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, k])
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, k],
                                     cga_layout=[[1, 0]])


@triton.constexpr_function
def a_operand_layout(acc_layout, k_width=4):
    """The layout of an MMA's A operand in registers (k_width: elements per 32-bit register, 4 for 8-bit P, 2 for
    16-bit), P as the next MMA reads it from the accumulator."""
    return gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=k_width)


@gluon.jit
def quad_rows(BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CTAS: gl.constexpr = 1):
    """Zeros [BLOCK_M, 4] laid out as a Q·Kᵀ accumulator's per-thread row maxima: one column per lane quad,
    which is also K's scale index (keys 8j + 2r + e share scale r)."""
    s4 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout(BLOCK_N, 32, CTAS)).reshape([BLOCK_M, BLOCK_N // 8, 4, 2])
    return gl.max(gl.max(s4, 3), 1)


@gluon.jit
def _tile_m(CAUSAL: gl.constexpr):
    """The CTA's query tile. Causal tiles run in reverse: the longest (the last rows see every key) start first
    and the shortest fill the last wave."""
    if CAUSAL:
        return gl.num_programs(0) - 1 - gl.program_id(0)
    return gl.program_id(0)


@gluon.jit
def _key_blocks(row_end, Nk, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """How many key blocks rows below row_end read: every one, or (causal) up to the one holding key row_end − 1."""
    if CAUSAL:
        return (gl.minimum(Nk, row_end) + BLOCK_N - 1) // BLOCK_N
    return (Nk + BLOCK_N - 1) // BLOCK_N


@gluon.jit
def _load_kv(desc, coord, bar, buf, CTAS: gl.constexpr):
    """A K or V tile into this stage; in a cluster (CTAS=2) sent to both CTAs' rings by one copy (multicast)."""
    if CTAS == 1:
        _tma_load(desc, coord, bar, buf)
    else:
        _tma_load(desc, coord, bar, buf, multicast=True)


@gluon.jit
def _producer(descs, smem, bars, sizes, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CONSUMERS: gl.constexpr,
              STAGES: gl.constexpr, PV16: gl.constexpr, CAUSAL: gl.constexpr, CTAS: gl.constexpr):
    """One warp: the consumers' Q tiles once, then K and V block by block into the next stage of the ring once
    the consumers have released it (in a cluster: the consumers of both CTAs, `empty_all`, waited on by the
    CTA that issues the multicast copy; the other CTA's producer only expects the bytes)."""
    q_desc, k_desc, v_desc = descs
    q_smem, kv_smem = smem
    k_smem, v_smem = kv_smem
    q_bar, ready, empty, empty_all = bars
    Hq, GROUP, Nq, Nk, Nq_pad, Nk_pad = sizes
    pid_m = _tile_m(CAUSAL)
    ROWS: gl.constexpr = BLOCK_M * CTAS  # a consumer's rows in the cluster
    bh = gl.program_id(1)
    bhk = (bh // Hq) * (Hq // GROUP) + (bh % Hq) // GROUP
    D: gl.constexpr = q_desc.block_type.shape[1]
    # rows past this head's end read the next head's (or the bulk-copy engine's zeros): their outputs are masked
    if CTAS == 1:
        Q_BYTES: gl.constexpr = q_desc.block_type.nbytes
        KV_BYTES: gl.constexpr = k_desc.block_type.nbytes + v_desc.block_type.nbytes
    else:  # what lands in this CTA: half of each Q tile, all of K and V
        Q_BYTES: gl.constexpr = q_desc.nbytes_per_cta
        KV_BYTES: gl.constexpr = k_desc.nbytes_per_cta + v_desc.nbytes_per_cta
    mbarrier.expect(q_bar, CONSUMERS * Q_BYTES)
    for i in gl.static_range(CONSUMERS):
        _tma_load(q_desc, [bh * Nq_pad + (pid_m * CONSUMERS + i) * ROWS, 0], q_bar, q_smem.index(i))
    Hkv = Hq // GROUP
    for j in range(_key_blocks((pid_m + 1) * CONSUMERS * ROWS, Nk, BLOCK_N, CAUSAL)):
        s = j % STAGES
        # a fresh barrier counts as having completed the phase before phase 0: the first pass does not wait
        mbarrier.wait(empty.index(s), ((j // STAGES) & 1) ^ 1)
        if CTAS > 1:  # the issuing CTA only (the cluster barrier's wait): the peer's consumers are done too
            mbarrier.wait(empty_all.index(s), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), KV_BYTES)
        _load_kv(k_desc, [bhk * Nk_pad + j * BLOCK_N, 0], ready.index(s), k_smem.index(s), CTAS)
        if PV16:  # the user's v, [B, Hkv, Nk, D]: keys past Nk arrive as zeros
            _load_kv(v_desc, [bhk // Hkv, bhk % Hkv, j * BLOCK_N, 0], ready.index(s), v_smem.index(s), CTAS)
        else:
            _load_kv(v_desc, [bhk * D, j * BLOCK_N], ready.index(s), v_smem.index(s), CTAS)


@gluon.jit
def _softmax(j, s, m_i, ks, c_q, ks_ptr, row0, n_blocks, Nk, MASKED: gl.constexpr, P_SHIFT: gl.constexpr,
             CAUSAL: gl.constexpr):
    """Key block j's Q·Kᵀ accumulator to P: (the new row max, P in FP32, the old max's factor, the next block's K
    scales)."""
    BLOCK_M: gl.constexpr = s.shape[0]
    BLOCK_N: gl.constexpr = s.shape[1]
    s = (s + MAGIC_BITS).to(gl.float32, bitcast=True)  # MAGIC + Q·K
    if MASKED:  # indices made here, not held across the unmasked loop (they would take 32 registers there)
        cols = j * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(0, s.type.layout))
        keep = cols[None, :] < Nk
        if CAUSAL:  # block 0 holds key 0, which every row sees: no row's max stays -inf
            rows = row0 + gl.arange(0, BLOCK_M, gl.SliceLayout(1, s.type.layout))
            keep = keep & (cols[None, :] <= rows[:, None])
        s = gl.where(keep, s, float("-inf"))
    s = s.reshape([BLOCK_M, BLOCK_N // 8, 4, 2])
    c = c_q[:, None] * ks[None, :]
    ks = gl.load(ks_ptr + gl.minimum(j + 1, n_blocks - 1) * 4)  # the next block's scales, loaded a block early
    mx = gl.convert_layout(_max_tree(gl.max(s, 3)), c.type.layout, assert_trivial=True)
    m_new = gl.maximum(m_i, gl.max((mx - MAGIC) * c, 1))
    off = m_new[:, None] + MAGIC * c - P_SHIFT
    p = gl.exp2(s * c[:, None, :, None] - off[:, None, :, None]).reshape([BLOCK_M, BLOCK_N])
    return m_new, p, gl.exp2(m_i - m_new), ks


@gluon.jit
def _block(j, m_i, l_i, acc, ks, c_q, ks_ptr, row0, zero_s, o_zero, q, k_smem, v_smem, ready, empty, n_blocks,
           Nk, MASKED: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, p_layout: gl.constexpr,
           o_layout: gl.constexpr, P_SHIFT: gl.constexpr, PV16: gl.constexpr, CAUSAL: gl.constexpr, empty_all,
           CTAS: gl.constexpr):
    """Key block j for one consumer warpgroup."""
    st = j % STAGES
    mbarrier.wait(ready.index(st), (j // STAGES) & 1)
    s = warpgroup_mma(q, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False)
    m_new, p, alpha, ks = _softmax(j, s, m_i, ks, c_q, ks_ptr, row0, n_blocks, Nk, MASKED, P_SHIFT, CAUSAL)
    alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    if PV16:
        # P in v's dtype, already in the operand's register order; v [BLOCK_N, D] as it came. The MMA accumulates
        # in FP32 into the rescaled accumulator: no block-sized partial result held beside it (spilled 152 B at
        # three consumers). FlashAttention-3's overlap of the next block's softmax with this P·V (two consumers:
        # three spilled 264 B) and a rescale skipped while no row max grows by 2^8 measured slower (NOTES, v11).
        acc = acc * alpha_o
        l_i = l_i * alpha
        pv_tok = warpgroup_mma(gl.convert_layout(p.to(v_smem.dtype), p_layout, assert_trivial=True),
                               v_smem.index(st).reshape([BLOCK_N, o_zero.shape[1]]), acc, is_async=True)
    else:
        # FP8 P with its keys in the operand's order (v8 stored [D, BLOCK_N] in that order); one block's products
        # summed in the MMA, then added in FP32 (FP8 MMAs keep fewer bits than FP32: _attention.py)
        p8 = _mma_a_order(p.to(gl.float8e4nv))
        pv_tok = warpgroup_mma(gl.convert_layout(p8, p_layout, assert_trivial=True), v_smem.index(st).permute((1, 0)),
                               o_zero, use_acc=False, is_async=True)
    psum = gl.convert_layout(gl.sum(p, 1), alpha.type.layout)  # beside the MMA
    pv = warpgroup_mma_wait(0, deps=(pv_tok, ))
    mbarrier.arrive(empty.index(st))  # one arrival per warpgroup, as the ring's barriers count
    if CTAS > 1:
        mbarrier.arrive(empty_all.index(st))
    if PV16:
        l_i = l_i + psum
        acc = pv
    else:
        l_i = l_i * alpha + psum
        acc = acc * alpha_o + pv
    return m_new, l_i, acc, ks


@gluon.jit
def _consumer(wg: gl.constexpr, smem, bars, ptrs, sizes, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              STORE_LSE: gl.constexpr, CONSUMERS: gl.constexpr, STAGES: gl.constexpr, PV16: gl.constexpr,
              CAUSAL: gl.constexpr, CTAS: gl.constexpr):
    """One warpgroup: rows [ROWS·wg, ROWS·(wg+1)) of the CTA's (cluster's) tile over every key block, then its
    output; ROWS = BLOCK_M · CTAS, a cluster's rows split between its CTAs."""
    q_smem, kv_smem = smem
    k_smem, v_smem = kv_smem
    q_bar, ready, empty, empty_all = bars
    QS, KS, VS, O, LSE, sob, soh, son = ptrs
    Hq, GROUP, Nq, Nk, Nq_pad, Nk_pad = sizes
    D: gl.constexpr = q_smem.shape[2]
    ROWS: gl.constexpr = BLOCK_M * CTAS
    s_layout: gl.constexpr = mma_layout(BLOCK_N, 32, CTAS)
    o_layout: gl.constexpr = mma_layout(D, 16 if PV16 else 32, CTAS)
    p_layout: gl.constexpr = a_operand_layout(o_layout, 2 if PV16 else 4)
    # FP8 P is scaled to just under 448 (_attention.P_SHIFT_FP8); 16-bit P is at most 1
    P_SHIFT: gl.constexpr = 0.0 if PV16 else FP8_SHIFT
    r_layout: gl.constexpr = quad_rows(ROWS, BLOCK_N, CTAS).type.layout
    row_layout: gl.constexpr = gl.SliceLayout(1, r_layout)

    bh = gl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    bhk = b * (Hq // GROUP) + h // GROUP
    n_blocks = (Nk + BLOCK_N - 1) // BLOCK_N
    pid_m = _tile_m(CAUSAL)
    row0 = (pid_m * CONSUMERS + wg) * ROWS

    qrows = row0 + gl.arange(0, ROWS, row_layout)
    c_q = gl.load(QS + bh.to(gl.int64) * Nq_pad + qrows, mask=qrows < Nq_pad, other=0.0)
    ks_ptr = KS + bhk.to(gl.int64) * (Nk_pad // BLOCK_N * 4) + gl.arange(0, 4, gl.SliceLayout(0, r_layout))
    zero_s = gl.zeros([ROWS, BLOCK_N], gl.int32, s_layout)
    o_zero = gl.zeros([ROWS, D], gl.float32, o_layout)
    st = (gl.full([ROWS], float("-inf"), gl.float32, row_layout), gl.zeros([ROWS], gl.float32, row_layout),
          o_zero, gl.load(ks_ptr))
    q = q_smem.index(wg)
    mbarrier.wait(q_bar, 0)
    # blocks every row sees whole run unmasked; then the tail (where Nk is not a multiple of BLOCK_N) and, causal,
    # the block holding the diagonal (BLOCK_M divides BLOCK_N: the rows' diagonal lies in one block)
    n_whole = Nk // BLOCK_N
    if CAUSAL:
        n_whole = gl.minimum(n_whole, row0 // BLOCK_N)
    n_mine = _key_blocks(row0 + ROWS, Nk, BLOCK_N, CAUSAL)
    for j in range(0, n_whole):
        st = _block(j, *st, c_q, ks_ptr, row0, zero_s, o_zero, q, k_smem, v_smem, ready, empty, n_blocks,
                    Nk, False, BLOCK_N, STAGES, p_layout, o_layout, P_SHIFT, PV16, CAUSAL, empty_all, CTAS)
    for j in range(n_whole, n_mine):
        st = _block(j, *st, c_q, ks_ptr, row0, zero_s, o_zero, q, k_smem, v_smem, ready, empty, n_blocks,
                    Nk, True, BLOCK_N, STAGES, p_layout, o_layout, P_SHIFT, PV16, CAUSAL, empty_all, CTAS)
    # causal: the CTA's later warpgroups read blocks past this one's; its arrival still counts in their stages'
    # "empty" barriers, given once each block has landed (earlier, it would count toward the stage's last use)
    for j in range(n_mine, _key_blocks((pid_m + 1) * CONSUMERS * ROWS, Nk, BLOCK_N, CAUSAL)):
        mbarrier.wait(ready.index(j % STAGES), (j // STAGES) & 1)
        mbarrier.arrive(empty.index(j % STAGES))
    m_i, l_i, acc, ks = st

    out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    d = gl.arange(0, D, gl.SliceLayout(0, o_layout))
    if not PV16:  # v8's per-channel scale
        out = out * gl.load(VS + bhk.to(gl.int64) * D + d)[None, :]
    orows = row0 + gl.arange(0, ROWS, gl.SliceLayout(1, o_layout))
    o_ptrs = O + b.to(gl.int64) * sob + h.to(gl.int64) * soh + orows[:, None].to(gl.int64) * son + d[None, :]
    gl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(orows < Nq)[:, None])
    if STORE_LSE:
        lse_ptrs = LSE + bh.to(gl.int64) * Nq + qrows  # holds scale·q·m from the quantization pass (_attention.py)
        gl.store(lse_ptrs, gl.load(lse_ptrs, mask=qrows < Nq) + (m_i + gl.log2(l_i) - P_SHIFT) * LN2, mask=qrows < Nq)


@gluon.jit
def _attn_ws_kernel(q_desc, k_desc, v_desc, QS, KS, VS, O, LSE, sob, soh, son, Hq, GROUP, Nq, Nk, Nq_pad, Nk_pad,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STORE_LSE: gl.constexpr,
                    CONSUMERS: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PV16: gl.constexpr,
                    CAUSAL: gl.constexpr, CTAS: gl.constexpr):
    D: gl.constexpr = q_desc.block_type.shape[1]
    gl.static_assert(D <= 256)  # keeps |Q·K| < 2^22 for the MAGIC conversion
    gl.static_assert(BLOCK_M == 64)  # one warpgroup's MMA rows
    gl.static_assert(CONSUMERS >= 1 and CONSUMERS <= 3)
    gl.static_assert(CTAS == 1 or not CAUSAL)  # a cluster's CTAs would read different key ranges

    q_smem = gl.allocate_shared_memory(gl.int8, [CONSUMERS, BLOCK_M * CTAS, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    if CTAS == 1:
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty_all = empty
    else:  # per-CTA barriers, and one per stage that both CTAs' consumers arrive on (held by the issuing CTA)
        q_bar = _allocate_mbarrier()
        ready = _allocate_mbarrier(batch=STAGES)
        empty = _allocate_mbarrier(batch=STAGES)
        empty_all = _allocate_mbarrier(batch=STAGES, two_ctas=True)
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)  # the producer's expect-tx arrival
        mbarrier.init(empty.index(i), count=CONSUMERS)  # one arrival per consumer warpgroup
        if CTAS > 1:
            mbarrier.init(empty_all.index(i), count=CONSUMERS)  # times the CTAs: init counts the group

    smem = (q_smem, (k_smem, v_smem))
    bars = (q_bar, ready, empty, empty_all)
    ptrs = (QS, KS, VS, O, LSE, sob, soh, son)
    sizes = (Hq, GROUP, Nq, Nk, Nq_pad, Nk_pad)
    descs = (q_desc, k_desc, v_desc)
    # the default partition (num_warps=4) is consumer 0, the others are workers. Constexprs reach a partition
    # only inside tuple literals (a tuple bound to a name first turns them into tensors), hence one call a count.
    W0: gl.constexpr = 0
    W1: gl.constexpr = 1
    W2: gl.constexpr = 2
    if CONSUMERS == 1:
        gl.warp_specialize([
            (_consumer, (W0, smem, bars, ptrs, sizes, BLOCK_M, BLOCK_N, STORE_LSE, CONSUMERS, STAGES, PV16, CAUSAL,
                          CTAS)),
            (_producer, (descs, smem, bars, sizes, BLOCK_M, BLOCK_N, CONSUMERS, STAGES, PV16, CAUSAL, CTAS))],
            [1], [PRODUCER_REGS])
    elif CONSUMERS == 2:
        gl.warp_specialize([
            (_consumer, (W0, smem, bars, ptrs, sizes, BLOCK_M, BLOCK_N, STORE_LSE, CONSUMERS, STAGES, PV16, CAUSAL,
                          CTAS)),
            (_consumer, (W1, smem, bars, ptrs, sizes, BLOCK_M, BLOCK_N, STORE_LSE, CONSUMERS, STAGES, PV16, CAUSAL,
                          CTAS)),
            (_producer, (descs, smem, bars, sizes, BLOCK_M, BLOCK_N, CONSUMERS, STAGES, PV16, CAUSAL, CTAS))],
            [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_consumer, (W0, smem, bars, ptrs, sizes, BLOCK_M, BLOCK_N, STORE_LSE, CONSUMERS, STAGES, PV16, CAUSAL,
                          CTAS)),
            (_consumer, (W1, smem, bars, ptrs, sizes, BLOCK_M, BLOCK_N, STORE_LSE, CONSUMERS, STAGES, PV16, CAUSAL,
                          CTAS)),
            (_consumer, (W2, smem, bars, ptrs, sizes, BLOCK_M, BLOCK_N, STORE_LSE, CONSUMERS, STAGES, PV16, CAUSAL,
                          CTAS)),
            (_producer, (descs, smem, bars, sizes, BLOCK_M, BLOCK_N, CONSUMERS, STAGES, PV16, CAUSAL, CTAS))],
            [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))
        if CTAS > 1:
            mbarrier.invalidate(empty_all.index(i))


def consumer_regs(consumers, maxnreg):
    """Registers a consumer warpgroup gets from the CTA's pool (maxnreg for each of its 4·(consumers + 1) warps:
    the producer's warp takes a whole warpgroup) once the producer has its share; setmaxnreg takes multiples
    of 8."""
    return (maxnreg * (consumers + 1) - PRODUCER_REGS.value) // consumers // 8 * 8


def cluster(ctas, causal) -> int:
    """CTAs a cluster for this call: the table's `ctas` for full attention where this Triton multicasts, else one
    (a causal cluster's CTAs would need different key ranges)."""
    return ctas if ctas > 1 and not causal and MULTICAST else 1


@functools.cache
def _triton_tested() -> bool:
    return triton.__version__.startswith(TESTED_TRITON)


def usable() -> bool:
    """Whether this kernel may run here: the installed Triton is one it was measured with (or COMFY_SAGE_WS=1),
    and COMFY_SAGE_WS is not 0."""
    env = os.environ.get(ENV, "")
    return env != "0" and (env == "1" or _triton_tested())


def takes(v) -> bool:
    """Whether this kernel reads v ([B, Hkv, Nk, D] view) in place: 16-bit, and the bulk-copy engine takes it."""
    return v.dtype in (torch.float16, torch.bfloat16) and bulk_copyable(v)


def _descriptors(qz, v, dims, block_m, block_n, ctas=1):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, Hq, Hkv, Nq, Nk, D, DP = dims
    q8, k8, v8 = qz.q8, qz.k8, qz.v8

    def lay(block, dtype, split=False):
        """Shared layout of a tile; in a cluster split by rows between the CTAs (Q) or whole in both (K, V)."""
        if ctas == 1:
            return gl.NVMMASharedLayout.get_default_for(block, dtype)
        cga = [[1 if split else 0] + [0] * (len(block) - 1)]
        return gl.NVMMASharedLayout.get_default_for(block, dtype, cga_layout=cga)

    rows = block_m * ctas
    dq = TensorDescriptor(q8, [B * Hq * q8.shape[2], D], [q8.shape[3], 1], [rows, D], lay([rows, D], gl.int8, True))
    dk = TensorDescriptor(k8, [B * Hkv * k8.shape[2], D], [k8.shape[3], 1], [block_n, D], lay([block_n, D], gl.int8))
    if v is None:
        dv = TensorDescriptor(v8, [B * Hkv * D, v8.shape[3]], [v8.shape[3], 1], [D, block_n],
                              lay([D, block_n], gl.float8e4nv))
    else:  # the user's 16-bit v, any strides the bulk-copy engine takes
        if not takes(v):
            raise ValueError("the warp-specialized kernel takes a 16-bit v with 16-byte aligned rows and strides")
        gdt = gl.float16 if v.dtype == torch.float16 else gl.bfloat16
        block = [1, 1, block_n, D]
        dv = TensorDescriptor(v, list(v.shape), list(v.stride()), block, lay(block, gdt))
    return dq, dk, dv


def attention(qz, out, lse, *, dims, block_m, block_n, consumers, stages, maxnreg, v=None, causal=False, ctas=1):
    """Launch over the tensors from _quant.quantize (head dim 64 or 128 unpadded): FP8 P·V on qz.v8, or 16-bit P·V on
    `v` (the user's [B, Hkv, Nk, D] view, fp16/bf16, 16-byte aligned rows); `out` a [B, Hq, Nq, D] view (last dim
    contiguous), `lse` [B, Hq, Nq] fp32 or None. A CTA takes block_m · consumers query rows. `causal`: query i
    sees keys j <= i (SDPA's mask). `ctas=2`: clusters of two CTAs of the same head, K and V copied once for both
    (multicast), where `cluster` allows it."""
    B, Hq, Hkv, Nq, Nk, D, DP = dims
    ctas = cluster(ctas, causal)
    if (D != DP or D not in (64, 128) or block_m != 64 or block_n % block_m or (qz.v8 is None) == (v is None)
            or qz.q8.shape[3] != D):
        raise ValueError(f"the warp-specialized kernel takes FP8 v8 or a 16-bit v, and head dim 64 or 128 with "
                         f"64-row tiles and key blocks a multiple of them (got head dim {D}, blocks {block_m} x "
                         f"{block_n})")
    Nq_pad, Nk_pad = qz.q8.shape[2], qz.k8.shape[2]
    dq, dk, dv = _descriptors(qz, v, dims, block_m, block_n, ctas)
    rows = block_m * consumers * ctas
    _attn_ws_kernel[(triton.cdiv(Nq_pad, rows), B * Hq)](
        dq, dk, dv, qz.qs, qz.ks, qz.vs if v is None else qz.qs, out, lse if lse is not None else qz.qs,
        out.stride(0), out.stride(1), out.stride(2), Hq, Hq // Hkv, Nq, Nk, Nq_pad, Nk_pad,
        BLOCK_M=block_m, BLOCK_N=block_n, STORE_LSE=lse is not None, CONSUMERS=consumers, STAGES=stages,
        CONSUMER_REGS=consumer_regs(consumers, maxnreg), PV16=v is not None, CAUSAL=bool(causal), CTAS=ctas,
        num_warps=4, **({"num_ctas": ctas} if ctas > 1 else {}), **launch_options(maxnreg))
