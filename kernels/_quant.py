"""Fused quantization: one launch reads q, k, v once and writes INT8 q and k, FP8 or INT8 v (8-bit P·V), and scales.

- q: one scale per token (finest granularity, free in the attention kernel: it scales a row), with
  `softmax scale · log2(e)` folded in so the attention kernel's softmax is a single exp2.
- k: smoothed by subtracting a mean over tokens, then four scales per BLOCK_N tokens (the attention kernel's key
  block): keys 8j + 2r + e of a block share scale r, because the MMA accumulator layouts (mma.sync and wgmma)
  give each thread the keys of one r, so a thread still needs one scale per row; or one scale per token (K_TOKEN,
  the "fine" variant: a token with outlier keys then costs only itself). Any vector shared by all tokens keeps the
  scores exact up to a per-row shift, which softmax ignores; we use the mean of SAMPLE evenly spaced tokens so
  every program computes the same vector from a few L2-resident rows and k is still read once.
- v (FP8 path only): one scale per channel over all tokens, stored transposed ([D, N]) because FP8 tensor cores
  want both operands K-major, its tokens in the order the attention kernel hands P to the MMA (v_slot). A
  whole-sequence scale lets the attention kernel apply it once after its loop instead of once per key block
  (per-block scales measured no more accurate: bench/NOTES.md); its maximum is one extra read of v before the
  launch.
- INT8 P·V path (pv="int8"): v as INT8 with a scale per key block and channel, computed by the program that
  quantizes the block (no pass before the launch), and that block's int32 column sums, stored as int16 (|sum| <=
  127·128); k per token.
- Every path but FP8 (rotation_for): q and k rotated first by a block-Hadamard matrix (exact in exact arithmetic,
  since (qH)·(kH) = ROT·q·k; it spreads a channel that carries a large offset over the block, so no one channel
  sets a token's scale: relative L1 0.061 -> 0.023 on such inputs with FP16 P·V, bench/NOTES.md v11).

Where q, k, v are handed over (`quantize_taking`), the same kernel runs once per tensor instead, so that each 16-bit
tensor can be freed as soon as its own launch is queued.

Outputs are padded to whole blocks along tokens (pad rows written as zeros, so the attention kernel loads without
masks), not along the head dim. Extra memory: 0.5x q+k+v for the 8-bit copies plus 4 bytes per q row (and per k
row with per-token scales), and on the INT8 path 4 bytes per key block and channel: within 0.6x from head dim 16
(tests/test_kernels_gpu.py, bench/memory.py).
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._compat import launch_options

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)
SAMPLE = 64          # tokens averaged for the K smoothing vector
FP8_MAX = 448.0      # largest finite float8 e4m3fn
V_AMAX_BLOCKS = 8    # token blocks per program of the V maximum pass (fewer atomics per channel)


@triton.jit
def _round_int8(x):
    # Round half away from zero, then truncate: the same on GPUs and in the interpreter.
    return (x + tl.where(x >= 0, 0.5, -0.5)).to(tl.int8)


@triton.jit
def _hadamard(x, ROT: tl.constexpr):
    """x [R, DP] times the block-diagonal ±1 Hadamard matrix with ROT-wide blocks (Sylvester's: H[i, j] =
    (-1)^popcount(i & j)), in fp32. On the tensor cores in x's dtype: ±1 products are exact, sums in fp32 (fp32
    inputs take IEEE fp32, not TF32). Unnormalized (H·Hᵀ = ROT·I): the 1/ROT of (qH)·(kH) goes into q's scale."""
    R: tl.constexpr = x.shape[0]
    DP: tl.constexpr = x.shape[1]
    W: tl.constexpr = 16 if ROT < 16 else ROT  # tl.dot's narrowest operand: ROT-wide blocks on a W-wide diagonal
    i = tl.arange(0, W)
    ij = i[:, None] & i[None, :]
    odd = ij & 1
    for bit in tl.static_range(1, 7):  # parity of i & j (W <= 128)
        odd = odd ^ ((ij >> bit) & 1)
    # through fp32: the interpreter converts int32 to bfloat16 as raw bits (-1 became a NaN)
    h = tl.where(i[:, None] // ROT == i[None, :] // ROT, 1.0 - 2.0 * odd, 0.0).to(x.dtype)
    xw = x.reshape(R * (DP // W), W)
    if x.dtype == tl.float32:
        y = tl.dot(xw, h, input_precision="ieee")
    else:
        y = tl.dot(xw, h, out_dtype=tl.float32)
    return y.reshape(R, DP)


@triton.jit
def _load_tile(ptrs, row_ok, d, D: tl.constexpr, DP: tl.constexpr, ROT: tl.constexpr):
    """A [rows, DP] tile in fp32, zeros past the head dim and the valid rows; rotated where ROT > 1."""
    if D == DP:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        x = tl.load(ptrs, mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    if ROT > 1:
        return _hadamard(x, ROT)
    return x.to(tl.float32)


@triton.jit
def _k_mean(kbase, skn, Nk, d, D: tl.constexpr, DP: tl.constexpr, SAMPLE_N: tl.constexpr, ROT: tl.constexpr):
    """K's smoothing vector: the mean of SAMPLE_N evenly spaced tokens (the same in every program that asks)."""
    si = tl.arange(0, SAMPLE_N)
    srows = (si.to(tl.int64) * Nk) // SAMPLE_N
    x = _load_tile(kbase + srows[:, None] * skn + d[None, :], si < SAMPLE_N, d, D, DP, ROT)
    return tl.sum(x, axis=0) / SAMPLE_N


@triton.jit
def _quant_q(Q, Q8, QS, LSE, K, bh, b, h, pid, sqb, sqh, sqn, skb, skh, skn, Nq, Nk, Nq_pad, q_mult, hk,
             D: tl.constexpr, DP: tl.constexpr, DS: tl.constexpr, BLOCK_Q: tl.constexpr, SAMPLE_N: tl.constexpr,
             Q_DOT_KMEAN: tl.constexpr, ROT: tl.constexpr):
    # q: per-token scale, with softmax scale * log2(e) (and the rotation's 1/ROT) folded in.
    d = tl.arange(0, DP)
    rows = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    if Q_DOT_KMEAN:  # K's mean before q's tile is loaded: the two tiles are never live together (registers)
        m = _k_mean(K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh, skn, Nk, d, D, DP, SAMPLE_N, ROT)
    x = _load_tile(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + rows[:, None].to(tl.int64) * sqn
                   + d[None, :], rows < Nq, d, D, DP, ROT)
    if Q_DOT_KMEAN:
        # softmax scale · q·m in fp32 from the unquantized q: what the kernel's LSE lacks after K's smoothing,
        # written into the LSE output, to which the attention kernel adds its own (no buffer of its own); both
        # rotated where ROT > 1: (qH)·(mH) = ROT · q·m
        tl.store(LSE + bh.to(tl.int64) * Nq + rows, tl.sum(x * m[None, :], axis=1) * (q_mult * LN2 / ROT),
                 mask=rows < Nq)
    amax = tl.max(tl.abs(x), axis=1)
    s = tl.where(amax > 0, amax / 127.0, 1.0)
    x8 = _round_int8(x * (1.0 / s)[:, None])
    base = (bh.to(tl.int64) * Nq_pad + rows) * DS
    tl.store(Q8 + base[:, None] + d[None, :], x8, mask=d[None, :] < D)
    tl.store(QS + bh.to(tl.int64) * Nq_pad + rows, s * (q_mult / ROT))


@triton.jit
def _quant_k(K, K8, KS, KM, bh, b, h, pid, skb, skh, skn, Nk, Nk_pad,
             D: tl.constexpr, DP: tl.constexpr, DS: tl.constexpr, BLOCK_K: tl.constexpr, SAMPLE_N: tl.constexpr,
             K_TOKEN: tl.constexpr, ROT: tl.constexpr):
    # k: smoothing vector from SAMPLE_N evenly spaced tokens (identical in every program), one scale per block
    # (or per token); rotated first where ROT > 1, so the smoothing vector is the rotated keys' mean.
    d = tl.arange(0, DP)
    rows = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    kbase = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    mean = _k_mean(kbase, skn, Nk, d, D, DP, SAMPLE_N, ROT)
    x = _load_tile(kbase + rows[:, None].to(tl.int64) * skn + d[None, :], rows < Nk, d, D, DP, ROT)
    x = tl.where((rows < Nk)[:, None], x - mean[None, :], 0.0)
    base = (bh.to(tl.int64) * Nk_pad + rows) * DS
    if K_TOKEN:
        amax = tl.max(tl.abs(x), axis=1)
        s = tl.where(amax > 0, amax / 127.0, 1.0)
        x8 = _round_int8(x * (1.0 / s)[:, None])
        tl.store(KS + bh.to(tl.int64) * Nk_pad + rows, s)
    else:  # four scales per block: keys 8j + 2r + e take scale r (one per thread in the MMA layout)
        xq = x.reshape(BLOCK_K // 8, 4, 2, DP)
        amax = tl.max(tl.max(tl.max(tl.abs(xq), axis=3), axis=2), axis=0)
        s = tl.where(amax > 0, amax / 127.0, 1.0)
        x8 = _round_int8(xq * (1.0 / s)[None, :, None, None]).reshape(BLOCK_K, DP)
        tl.store(KS + (bh.to(tl.int64) * (Nk_pad // BLOCK_K) + pid) * 4 + tl.arange(0, 4), s)
    tl.store(K8 + base[:, None] + d[None, :], x8, mask=d[None, :] < D)
    if pid == 0:
        tl.store(KM + bh.to(tl.int64) * DP + d, mean)


@triton.jit
def v_slot(n):
    """Where key n sits along v8's token axis: bits 1-2 and bit 3 of n swap places, the key order in which the
    attention kernel hands P to the FP8 P·V MMA (_attention._mma_a_order). Permutes within 16 keys only."""
    return (n & ~14) | ((n >> 2) & 2) | ((n << 1) & 12)


@triton.jit
def v_key(s):
    """The key at slot s of v8's token axis: v_slot's inverse."""
    return (s & ~14) | ((s >> 1) & 6) | ((s << 2) & 8)


@triton.jit
def _quant_v(V, V8, VS, VC, bh, b, h, pid, svb, svh, svn, Nk, Nk_pad,
             D: tl.constexpr, DP: tl.constexpr, BLOCK_K: tl.constexpr, V_INT8: tl.constexpr):
    # v, written transposed [D, Nk_pad], pad tokens zeros. FP8: per-channel scale (computed before the launch).
    # INT8: this program's tokens are one key block; a scale per channel of it, and its int8 column sums (the
    # attention kernel folds P's offset of 128 back through them). The tile's rows are loaded in slot order
    # (each row is still one contiguous read), so that the store's addresses run along the tile's rows, where
    # Triton's coalescing sees them: with v_slot in the store's address it stored single bytes, which Triton 3.9
    # did not coalesce (the pass 3.2-3.9x its 3.6 time on the H200; bench/NOTES.md, v14).
    d = tl.arange(0, DP)
    slots = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = v_key(slots)
    x = _load_tile(V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + rows[:, None].to(tl.int64) * svn
                   + d[None, :], rows < Nk, d, D, DP, 1)
    if V_INT8:
        amax = tl.max(tl.abs(x), axis=0)
        s = tl.where(amax > 0, amax / 127.0, 1.0)
        # stored as bfloat16 (the buffers stay within 0.6x q+k+v at head dim 16), rounded up so |v / s| <= 127
        s = ((s.to(tl.int32, bitcast=True) + 0xFFFF) & -65536).to(tl.float32, bitcast=True)
        x8 = _round_int8(x * (1.0 / s)[None, :])
        blk = (bh.to(tl.int64) * (Nk_pad // BLOCK_K) + pid) * D + d
        tl.store(VS + blk, s.to(tl.bfloat16), mask=d < D)
        tl.store(VC + blk, tl.sum(x8.to(tl.int32), axis=0).to(tl.int16), mask=d < D)
    else:
        s = tl.load(VS + bh.to(tl.int64) * DP + d)
        x8 = (x * (1.0 / s)[None, :]).to(tl.float8e4nv)
    tl.store(V8 + (bh.to(tl.int64) * D + d[None, :]) * Nk_pad + slots[:, None], x8, mask=d[None, :] < D)


@triton.jit(do_not_specialize=["ROLE0"])
def _quant_kernel(Q, K, V, Q8, QS, LSE, K8, KS, KM, V8, VS, VC,
                  sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                  Hq, Hkv, BHq, BHkv, Nq, Nk, Nq_pad, Nk_pad, q_mult, ROLE0,
                  D: tl.constexpr, DP: tl.constexpr, DS: tl.constexpr,
                  BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, SAMPLE_N: tl.constexpr, QUANT_V: tl.constexpr,
                  K_TOKEN: tl.constexpr, Q_DOT_KMEAN: tl.constexpr, V_INT8: tl.constexpr, ROT: tl.constexpr):
    # One launch for all three tensors: axis 2 picks q, k or v; programs past a tensor's extent return. ROLE0 (a
    # runtime argument, not specialized: every launch runs one compiled kernel) offsets axis 2, so that a launch of
    # one tensor alone (`quantize_taking`) runs the same binary as the launch of all three.
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    role = tl.program_id(2) + ROLE0
    if role == 0:
        if (pid * BLOCK_Q < Nq_pad) & (bh < BHq):
            h = bh % Hq
            _quant_q(Q, Q8, QS, LSE, K, bh, bh // Hq, h, pid, sqb, sqh, sqn, skb, skh, skn, Nq, Nk, Nq_pad, q_mult,
                     h // (Hq // Hkv), D, DP, DS, BLOCK_Q, SAMPLE_N, Q_DOT_KMEAN, ROT)
    elif (pid * BLOCK_K < Nk_pad) & (bh < BHkv):
        if role == 1:
            _quant_k(K, K8, KS, KM, bh, bh // Hkv, bh % Hkv, pid, skb, skh, skn, Nk, Nk_pad, D, DP, DS, BLOCK_K,
                     SAMPLE_N, K_TOKEN, ROT)
        elif QUANT_V:
            _quant_v(V, V8, VS, VC, bh, bh // Hkv, bh % Hkv, pid, svb, svh, svn, Nk, Nk_pad, D, DP, BLOCK_K, V_INT8)


@triton.jit
def _v_amax_kernel(V, AMAX, svb, svh, svn, Hkv, Nk, D: tl.constexpr, DP: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCKS: tl.constexpr):
    # max |v| per channel over BLOCKS blocks of tokens, merged across programs with one atomic per channel
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    d = tl.arange(0, DP)
    base = V + (bh // Hkv).to(tl.int64) * svb + (bh % Hkv).to(tl.int64) * svh + d[None, :]
    amax = tl.zeros([DP], tl.float32)
    for i in range(BLOCKS):
        rows = (pid * BLOCKS + i) * BLOCK_K + tl.arange(0, BLOCK_K)
        x = _load_tile(base + rows[:, None].to(tl.int64) * svn, rows < Nk, d, D, DP, 1)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
    tl.atomic_max(AMAX + bh.to(tl.int64) * DP + d, amax, mask=d < D)


@dataclass
class Quantized:
    q8: torch.Tensor      # [B, Hq, Nq_pad, DS] int8
    qs: torch.Tensor      # [B, Hq, Nq_pad] fp32, includes softmax scale * log2(e)
    k8: torch.Tensor      # [B, Hkv, Nk_pad, DS] int8, smoothed
    ks: torch.Tensor      # [B, Hkv, Nk_pad // block_n, 4] fp32, or [B, Hkv, Nk_pad] with k_token
    kmean: torch.Tensor   # [B, Hkv, DP] fp32, the smoothing vector (tests check it against the model)
    v8: torch.Tensor | None   # [B, Hkv, D, Nk_pad] float8_e4m3fn (FP8 path) or int8 (INT8 path)
    vs: torch.Tensor | None   # [B, Hkv, DP] fp32 (FP8), [B, Hkv, Nk_pad // block_n, D] bf16 (INT8)
    vc: torch.Tensor | None = None  # [B, Hkv, Nk_pad // block_n, D] int16: v8's column sums per key block (INT8)


def row_bytes(D: int) -> int:
    """Bytes per int8 row of q8/k8: padded to 16 (what the bulk-copy path needs; H200, head dim 72: the pointer
    path ran 0.88x cuDNN) where that adds at most an eighth, else unpadded, so the buffers stay within 0.6x
    q+k+v at any head dim >= 16."""
    padded = _ceil(D, 16)
    return padded if padded * 8 <= D * 9 else D


def quant_warps(head_dim_bucket: int) -> int:
    """Warps of the quantization launch: with 4, a [64 or 128, >= 128] tile ran out of registers (255 and 96-184
    B of spill on sm89/sm90, bench/arch_check.py); 8 halves the registers and spills nothing."""
    return 8 if head_dim_bucket >= 128 else 4


def rotation_width(D: int) -> int:
    """Width of the block-Hadamard rotation of q and k: the largest power of two dividing the head dim (blocks must
    not straddle it), at most 64: 128-wide blocks spilled 272-736 B in the quantization kernel at head dim 256
    (bench/arch_check.py), and at head dim 128 the v10 study measured 64 as accurate as the whole head
    (bench/NOTES.md). 1: none."""
    return min(D & -D, 64)


def rotation_for(pv: str, D: int) -> int:
    """The rotation width a P·V path quantizes q and k with: every path but FP8, the speed-first one (the rotation
    doubles the quantization pass's time, ~1.5% of a call at N=32k on the H200, and FP8's own P and V rounding
    dominates its error)."""
    return 1 if pv == "fp8" else rotation_width(D)


def _ceil(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def quantize(q, k, v, *, dims, scale: float, block_m: int, block_n: int, fp8_v: bool,
             k_token: bool = False, lse: torch.Tensor | None = None, int8_v: bool = False, rot: int = 1,
             maxnreg: int | None = None) -> Quantized:
    """q, k, v as [B, H, N, D] views (any strides, last dim contiguous); `dims` gives (B, Hq, Hkv, Nq, Nk, D, DP).
    `lse` ([B, Hq, Nq] fp32, the call's LSE output): receives scale · q·kmean per query row, the part of the LSE
    that K's smoothing takes out; the attention kernel adds the rest. `int8_v`: v as INT8 per key block and
    channel (with column sums); `rot` > 1: q and k rotated by the block-Hadamard matrix of that width; `maxnreg`: a
    register cap (the arch table's quant_maxnreg). One launch."""
    return _quantize([q, k, v], False, dims=dims, scale=scale, block_m=block_m, block_n=block_n, fp8_v=fp8_v,
                     k_token=k_token, lse=lse, int8_v=int8_v, rot=rot, maxnreg=maxnreg)


def quantize_taking(qkv: list, *, dims, scale: float, block_m: int, block_n: int, fp8_v: bool,
                    k_token: bool = False, lse: torch.Tensor | None = None, int8_v: bool = False,
                    rot: int = 1, maxnreg: int | None = None) -> Quantized:
    """`quantize` of [q, k, v] handed over in a list that holds their only references (ComfyUI core's containers):
    q, k and v are quantized by separate launches of the same compiled kernel, in that order, and each leaves the
    list (qkv[i] = None) as soon as its launch is queued, before the next one's buffers are allocated, so those reuse
    its memory. v leaves only where it is quantized (fp8_v, int8_v): the 16-bit P·V reads it. Freeing a tensor that
    a queued launch still reads is safe: PyTorch's caching allocator is stream-ordered, and the next use of that
    memory comes after the launch on the stream. Peak: q+k+v and q's 8-bit copy, 3.5 times one 16-bit tensor of q's
    size where SDPA holds q+k+v and its output, 4 times. The same results as `quantize`, bit for bit (each program
    computes the same values in either launch), from the binary that call compiled (`ROLE0`)."""
    return _quantize(qkv, True, dims=dims, scale=scale, block_m=block_m, block_n=block_n, fp8_v=fp8_v,
                     k_token=k_token, lse=lse, int8_v=int8_v, rot=rot, maxnreg=maxnreg)


def _quantize(src: list, split: bool, *, dims, scale, block_m, block_n, fp8_v, k_token, lse, int8_v, rot, maxnreg):
    # Holds no tensor of `src` in a local: with `split`, src[i] = None must free it.
    B, Hq, Hkv, Nq, Nk, D, DP = dims
    dev = src[0].device
    if dev.type != "cuda":  # Triton's interpreter: every launch starts here, so its fixes go in here (_interpret.py)
        from ._interpret import patch_interpreter

        patch_interpreter()
    DS = row_bytes(D)
    Nq_pad, Nk_pad = _ceil(Nq, block_m), _ceil(Nk, block_n)
    quant_v = fp8_v or int8_v
    strides = [s for t in src for s in t.stride()[:3]]
    q8 = torch.empty((B, Hq, Nq_pad, DS), dtype=torch.int8, device=dev)
    qs = torch.empty((B, Hq, Nq_pad), dtype=torch.float32, device=dev)

    def launch(grid, role0, Q, K, V, K8, KS, KM, V8, VS, VC):
        _quant_kernel[grid](
            Q, K, V, q8, qs, qs if lse is None else lse, K8, KS, KM, V8, VS, VC, *strides,
            Hq, Hkv, B * Hq, B * Hkv, Nq, Nk, Nq_pad, Nk_pad, scale * LOG2E, role0,
            D=D, DP=DP, DS=DS, BLOCK_Q=block_m, BLOCK_K=block_n, SAMPLE_N=SAMPLE, QUANT_V=quant_v, K_TOKEN=k_token,
            Q_DOT_KMEAN=lse is not None, V_INT8=int8_v, ROT=rot, num_warps=quant_warps(DP),
            **launch_options(maxnreg),
        )

    def k_buffers():
        ks = torch.empty((B, Hkv, Nk_pad) if k_token else (B, Hkv, Nk_pad // block_n, 4), dtype=torch.float32,
                         device=dev)
        return (torch.empty((B, Hkv, Nk_pad, DS), dtype=torch.int8, device=dev), ks,
                torch.empty((B, Hkv, DP), dtype=torch.float32, device=dev))

    def v_buffers(v):
        if int8_v:
            return (torch.empty((B, Hkv, D, Nk_pad), dtype=torch.int8, device=dev),
                    torch.empty((B, Hkv, Nk_pad // block_n, D), dtype=torch.bfloat16, device=dev),
                    torch.empty((B, Hkv, Nk_pad // block_n, D), dtype=torch.int16, device=dev))
        if fp8_v:
            # max |v| per channel in our own pass: torch's reductions over the token axis allocated 4x v's bytes
            amax = torch.zeros((B, Hkv, DP), dtype=torch.float32, device=dev)
            blk = max(16, 4096 // DP)
            _v_amax_kernel[(triton.cdiv(Nk, blk * V_AMAX_BLOCKS), B * Hkv)](
                v, amax, v.stride(0), v.stride(1), v.stride(2), Hkv, Nk, D=D, DP=DP, BLOCK_K=blk,
                BLOCKS=V_AMAX_BLOCKS, num_warps=4, **launch_options())
            return (torch.empty((B, Hkv, D, Nk_pad), dtype=torch.float8_e4m3fn, device=dev),
                    torch.where(amax > 0, amax / FP8_MAX, 1.0), None)
        return None, None, None

    if not split:
        k8, ks, kmean = k_buffers()
        v8, vs, vc = v_buffers(src[2])
        launch((max(Nq_pad // block_m, Nk_pad // block_n), B * max(Hq, Hkv), 3 if quant_v else 2), 0,
               src[0], src[1], src[2], k8, ks, kmean, v8 if quant_v else k8, vs if quant_v else ks,
               ks if vc is None else vc)
        return Quantized(q8, qs, k8, ks, kmean, v8, vs, vc)
    # Buffers not allocated yet are stood in for by small tensors of the dtypes the one-launch call passes (no launch
    # reads them), so that every launch has the signature that call compiled: pointer dtypes and alignment, and the
    # same integers (strides).
    def stand_in(dtype):
        return torch.empty(64, dtype=dtype, device=dev)

    f32 = stand_in(torch.float32)
    v8_ = stand_in(torch.float8_e4m3fn if fp8_v else torch.int8)
    vs_, vc_ = (stand_in(torch.bfloat16), stand_in(torch.int16)) if int8_v else (f32, f32)
    launch((Nq_pad // block_m, B * Hq, 1), 0, src[0], src[1], src[2], stand_in(torch.int8), f32, f32, v8_, vs_, vc_)
    src[0] = None
    k8, ks, kmean = k_buffers()
    launch((Nk_pad // block_n, B * Hkv, 1), 1, src[1], src[1], src[2], k8, ks, kmean, v8_, vs_ if quant_v else ks,
           vc_ if int8_v else ks)
    src[1] = None
    v8 = vs = vc = None
    if quant_v:
        v8, vs, vc = v_buffers(src[2])
        launch((Nk_pad // block_n, B * Hkv, 1), 2, src[2], src[2], src[2], k8, ks, kmean, v8, vs,
               ks if vc is None else vc)
        src[2] = None
    return Quantized(q8, qs, k8, ks, kmean, v8, vs, vc)
