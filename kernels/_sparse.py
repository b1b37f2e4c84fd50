"""Block-sparse 8-bit attention: which key blocks each query tile visits, chosen from pooled q and k.

Per batch, head and query tile (the kernel's block_m rows): the tile's mean query against each key block's mean
key (block_n keys) gives one score per block, scaled as the softmax's; the blocks are kept in descending softmax
mass of those scores until the kept mass reaches `keep`. Always kept: the first `sink` key blocks (attention
sinks), and in self-attention (Nq == Nk) the blocks holding the tile's own tokens, so no row is left without a
key. Causal attention never keeps a block wholly above the diagonal. The kernel then runs the kept blocks exactly
as the dense kernel runs all of them (same quantization, same online softmax over those keys) and skips the rest
at no cost; the skipped blocks' mass is dropped from the softmax, which `keep` (and calibration, measuring the
error on the model's own q and k) bounds.

The pooled scores are one batched matmul, a few heads at a time so they stay under CHUNK_BYTES; the rest is one
Triton pass per query tile (`_select_kernel`): the softmax of its scores, the threshold that keeps the wanted mass
(found by bisection on the scores' bits, so no sort), and the kept blocks written out in order. `_select_torch` is
the same selection in torch (argsort and cumulative sums): the model the tests hold the kernel to, and the path
for more key blocks than one tile's registers hold (MAX_KEY_BLOCKS).
"""
import math
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _arch
from ._compat import launch_options
from ._counters import note_density as _note_process_density
from .schedule import parse_sparse

CHUNK_BYTES = 64 << 20
MAX_KEY_BLOCKS = 8192  # one query tile's scores in registers (8192 keys of 128: a million tokens)
_last = threading.local()


@dataclass(frozen=True)
class Sparsity:
    """How much a call keeps."""

    keep: float = 0.9   # softmax mass of the pooled scores each query tile keeps, in (0, 1]
    sink: int = 1       # leading key blocks every tile keeps
    ratio: float | None = None  # instead of `keep`: this share of each tile's allowed blocks, highest scores first

    def __post_init__(self):
        if not 0.0 < self.keep <= 1.0 or math.isnan(self.keep):
            raise ValueError(f"sparse keep must be in (0, 1] (the share of attention mass kept); got {self.keep}")
        if self.ratio is not None and (not 0.0 < self.ratio <= 1.0 or math.isnan(self.ratio)):
            raise ValueError(f"sparse ratio must be in (0, 1] (the share of key blocks kept); got {self.ratio}")
        if self.sink < 0:
            raise ValueError(f"sparse sink must be >= 0 key blocks; got {self.sink}")


def from_variant(pv: str) -> Sparsity:
    """The Sparsity of a variant string "sparse:keep=F" or "sparse:ratio=F" (what schedules and calibration
    write); ValueError names a malformed one."""
    mode, share = parse_sparse(pv[len("sparse:"):], "pv")
    return Sparsity(keep=share) if mode == "keep" else Sparsity(ratio=share)


def note_density(density: float) -> None:
    """Remember a sparse call's density: for this thread (`last_density`, what adapters report per site) and for
    the process (`kernels.sparse_density()`)."""
    _last.density = density
    _note_process_density(density)


def last_density() -> float | None:
    """The density of this thread's last sparse call, then forgotten (None: no sparse call since)."""
    d = getattr(_last, "density", None)
    _last.density = None
    return d


@dataclass
class Request:
    """One call's sparsity, and the density its selection kept (None where the call ran exact attention)."""
    sparsity: Sparsity
    density: float | None = None


def sparse_attention(q, k, v, *, keep=0.9, sink=1, ratio=None, layout="HND", is_causal=False, scale=None,
                     pv="auto", return_density=False):
    """Block-sparse 8-bit attention (module docstring): sage_attention's arguments, plus `keep` (the share of
    each query tile's pooled attention mass whose key blocks it visits), `sink`, and `ratio` (a fixed share of
    each tile's key blocks instead of `keep`: for benchmarks at a set density). With return_density, also the
    share of (query, key) block pairs it ran (None where it fell back to exact attention). Counted as int8-sparse."""
    from . import _api

    req = Request(Sparsity(float(keep), int(sink), None if ratio is None else float(ratio)))
    out, _ = _api._forward(q, k, v, layout, bool(is_causal), scale, pv, False, sparse=req)
    return (out, req.density) if return_density else out


def _pool(x, block):
    """Mean over each block of `block` tokens of x [B, H, N, D] (any strides), in fp32: [B, H, ceil(N/block), D].
    Sums in fp32 without an fp32 copy of x."""
    N = x.shape[2]
    full = N // block * block
    parts = []
    if full:
        parts.append(x[:, :, :full].unflatten(2, (full // block, block)).sum(3, dtype=torch.float32) / block)
    if full < N:
        parts.append(x[:, :, full:].sum(2, keepdim=True, dtype=torch.float32) / (N - full))
    return torch.cat(parts, 2)


def select(q, k, *, block_m, block_n, causal, scale, sparsity: Sparsity):
    """(lut [B·Hq, query tiles, KMAX] int32, counts [B·Hq, query tiles, 2] int32, density) for q [B, Hq, Nq, D]
    and k [B, Hkv, Nk, D]. The lut lists each tile's kept key blocks ascending (entries past its count unused);
    counts holds how many of them need no mask (wholly inside the keys and, causal, wholly below the tile's first
    row: the kernel's unmasked loop) and how many there are. density: kept (query, key) block pairs over those
    the mask allows."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    nqb, nkb = -(-Nq // block_m), -(-Nk // block_n)
    if nkb > MAX_KEY_BLOCKS or _arch.arch_of(q.device) is None:  # or no Triton here (CPU, no interpreter)
        return _select_torch(q, k, block_m=block_m, block_n=block_n, causal=causal, scale=scale, sparsity=sparsity)
    if not q.is_cuda:
        from ._interpret import patch_interpreter

        patch_interpreter()
    qm = _pool(q, block_m)                                                 # [B, Hq, nqb, D]
    km = _pool(k, block_n).repeat_interleave(Hq // Hkv, 1)                # [B, Hq, nkb, D]
    NKB = triton.next_power_of_2(nkb)
    rows = max(1, min(16, 4096 // NKB))
    heads = max(1, CHUNK_BYTES // max(1, B * nqb * nkb * 8))               # scores and the chunk's full lut
    by_ratio = sparsity.ratio is not None
    share = sparsity.ratio if by_ratio else (sparsity.keep if sparsity.keep < 1.0 else float("inf"))
    cnt = torch.empty((B, Hq, nqb, 2), dtype=torch.int32, device=q.device)
    parts = []
    for h0 in range(0, Hq, heads):
        s = qm[:, h0:h0 + heads] @ km[:, h0:h0 + heads].transpose(-1, -2)   # [B, h, nqb, nkb], unscaled
        h = s.shape[1]
        lut = torch.empty_like(s, dtype=torch.int32)
        c = cnt[:, h0:h0 + h]
        _select_kernel[(triton.cdiv(nqb, rows), B * h)](
            s, lut, c, h, Nq, Nk, nqb, nkb, float(scale), float(share), int(sparsity.sink),
            s.stride(0), s.stride(1), lut.stride(0), lut.stride(1), c.stride(0), c.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, NKB=NKB, ROWS=rows, CAUSAL=bool(causal), SELF=Nq == Nk,
            BY_RATIO=by_ratio, num_warps=4 if NKB * rows <= 2048 else 8, **launch_options())
        del s
        parts.append(lut[..., :max(1, int(c[..., 1].max()))])              # as wide as its most kept blocks
    kmax = max(p.shape[-1] for p in parts)
    lut = parts[0] if len(parts) == 1 else torch.cat(
        [torch.nn.functional.pad(p, (0, kmax - p.shape[-1])) for p in parts], 1)
    return (lut.contiguous().view(B * Hq, nqb, kmax), cnt.view(B * Hq, nqb, 2),
            float(cnt[..., 1].sum()) / (_allowed_pairs(Nq, Nk, block_m, block_n, causal) * B * Hq))


def _allowed_pairs(Nq, Nk, block_m, block_n, causal) -> int:
    """(query tile, key block) pairs the mask allows: all, or (causal) those holding a key some row of the tile
    sees."""
    nqb, nkb = -(-Nq // block_m), -(-Nk // block_n)
    if not causal:
        return nqb * nkb
    return sum(min(nkb, (min((i + 1) * block_m, Nq) - 1) // block_n + 1) for i in range(nqb))


@triton.jit
def _select_kernel(S, LUT, CNT, H, Nq, Nk, nqb, nkb, scale, share, sink, s_b, s_h, l_b, l_h, c_b, c_h,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NKB: tl.constexpr, ROWS: tl.constexpr,
                   CAUSAL: tl.constexpr, SELF: tl.constexpr, BY_RATIO: tl.constexpr):
    """ROWS query tiles of one (batch, head): softmax of their pooled scores S over the allowed key blocks, then
    the blocks to keep. Ordered as _select_torch orders them (forced blocks first, then by mass), block j is kept
    when the weight strictly before it is under the budget: the mass before it under `share` (keep), or the blocks
    before it under ceil(share · allowed) (ratio). That holds exactly for the values at or above one threshold,
    found by bisecting the bits of v = mass + 2·forced (non-negative floats order as their bits)."""
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    i = (tl.program_id(0) * ROWS + tl.arange(0, ROWS))[:, None]             # query tiles [ROWS, 1]
    j = tl.arange(0, NKB)[None, :]                                          # key blocks [1, NKB]
    allowed = (i < nqb) & (j < nkb)
    if CAUSAL:  # a block whose first key some row of the tile sees
        allowed = allowed & (j * BLOCK_N <= tl.minimum((i + 1) * BLOCK_M, Nq) - 1)
    s = tl.load(S + b.to(tl.int64) * s_b + h * s_h + i * nkb + j, mask=allowed, other=float("-inf")) * scale
    m = tl.max(s, 1)
    m = tl.where(m == float("-inf"), 0.0, m)                               # rows past the last tile
    p = tl.where(allowed, tl.exp(s - m[:, None]), 0.0)
    p = p / tl.maximum(tl.sum(p, 1), 1e-30)[:, None]
    forced = j < sink
    if SELF:  # the tile's own tokens
        forced = forced | ((j * BLOCK_N < (i + 1) * BLOCK_M) & ((j + 1) * BLOCK_N > i * BLOCK_M))
    forced = forced & allowed
    v = p + 2.0 * forced.to(tl.float32)
    if BY_RATIO:
        w = allowed.to(tl.float32)
        budget = tl.ceil(share * tl.sum(w, 1))
    else:
        w = p
        budget = tl.zeros([ROWS], tl.float32) + share
    # smallest t with weight(v > t) < budget: v_j is kept iff v_j >= t. 31 halvings cover [0, 4.0]'s bits.
    lo = tl.zeros([ROWS], tl.int32)
    hi = tl.zeros([ROWS], tl.int32) + 0x40800000
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        t = mid.to(tl.float32, bitcast=True)
        under = tl.sum(tl.where(allowed & (v > t[:, None]), w, 0.0), 1) < budget
        hi = tl.where(under, mid, hi)
        lo = tl.where(under, lo, mid + 1)
    kept = allowed & (forced | (v >= hi.to(tl.float32, bitcast=True)[:, None]))
    k32 = kept.to(tl.int32)
    slot = tl.cumsum(k32, 1) - 1                                            # ascending, packed
    tl.store(LUT + b.to(tl.int64) * l_b + h * l_h + i * nkb + slot, j + 0 * slot, mask=kept)
    limit = Nk // BLOCK_N                                                   # unmasked: blocks j < limit
    if CAUSAL:
        limit = tl.minimum((i * BLOCK_M) // BLOCK_N, limit)
    unmasked, total = tl.sum(tl.where(j < limit, k32, 0), 1), tl.sum(k32, 1)
    col = tl.arange(0, 2)[None, :]  # (unmasked, total) as one 2-wide store: Triton 3.2's interpreter corrupts
    tl.store(CNT + b.to(tl.int64) * c_b + h * c_h + i * 2 + col,  # memory on two 1-wide ones
             tl.where(col == 0, unmasked[:, None], total[:, None]), mask=i < nqb)


def _select_torch(q, k, *, block_m, block_n, causal, scale, sparsity: Sparsity):
    """`select` in torch: an argsort of each tile's pooled mass and its cumulative sum (the model the kernel is held
    to); its lut is as wide as the most blocks a tile keeps."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    nqb, nkb = -(-Nq // block_m), -(-Nk // block_n)
    dev = q.device
    qm = _pool(q, block_m)                                                 # [B, Hq, nqb, D]
    km = _pool(k, block_n).repeat_interleave(Hq // Hkv, 1)                # [B, Hq, nkb, D]
    i = torch.arange(nqb, device=dev)[:, None]
    j = torch.arange(nkb, device=dev)[None, :]
    if causal:  # a block whose first key some row of the tile sees
        allowed = j * block_n <= torch.clamp((i + 1) * block_m, max=Nq) - 1
    else:
        allowed = torch.ones(nqb, nkb, dtype=torch.bool, device=dev)
    forced = j < sparsity.sink
    if Nq == Nk:  # the tile's own tokens
        forced = forced | ((j * block_n < (i + 1) * block_m) & ((j + 1) * block_n > i * block_m))
    forced = forced & allowed
    # unmasked: whole blocks of keys, and (causal) below the tile's first row, as the dense kernel splits them
    limit = (Nk // block_n) * block_n
    if causal:
        limit = torch.clamp((i * block_m) // block_n * block_n, max=limit)
    unmasked = (j + 1) * block_n <= limit
    heads = max(1, CHUNK_BYTES // max(1, B * nqb * nkb * 16))
    limit_blk = unmasked.expand(nqb, nkb).sum(-1, keepdim=True, dtype=torch.int32)  # unmasked: blocks j < this
    n_allowed = allowed.sum(-1, keepdim=True)
    counts, firsts = [], []
    for h0 in range(0, Hq, heads):
        s = (qm[:, h0:h0 + heads] @ km[:, h0:h0 + heads].transpose(-1, -2)) * scale
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
        # forced blocks first (p <= 1), then by pooled mass: what is kept is a prefix of this order
        order = (p + 2 * forced).argsort(-1, descending=True)
        rank = torch.arange(nkb, device=dev)
        if sparsity.ratio is not None:  # the tile's top ceil(ratio · allowed) blocks, and the forced ones
            take = rank < torch.ceil(sparsity.ratio * n_allowed)
        else:  # a block is kept while the mass before it is short of `keep` (the block crossing it is kept)
            mass = p.gather(-1, order)
            take = (mass.cumsum(-1) - mass) < sparsity.keep
        take = (take | forced.expand_as(order).gather(-1, order)) & allowed.expand_as(order).gather(-1, order)
        n = take.sum(-1, dtype=torch.int32)                              # [B, h, nqb]: kept = order[..., :n]
        counts.append(n)
        firsts.append(order[..., :max(1, int(n.max()))].to(torch.int32))
    n = torch.cat(counts, 1)
    kmax = max(f.shape[-1] for f in firsts)
    lut = torch.cat([torch.nn.functional.pad(f, (0, kmax - f.shape[-1]), value=nkb) for f in firsts], 1)
    rank = torch.arange(kmax, device=dev, dtype=torch.int32)
    lut = torch.where(rank < n[..., None], lut, nkb + rank).sort(-1).values  # kept ascending; the rest after them
    counts_unmasked = ((lut < limit_blk) & (rank < n[..., None])).sum(-1, dtype=torch.int32)
    counts = torch.stack([counts_unmasked, n], -1)
    density = float(n.sum()) / float(allowed.sum() * B * Hq)
    return lut.view(B * Hq, nqb, kmax), counts.view(B * Hq, nqb, 2).contiguous(), density
