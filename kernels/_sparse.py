"""Block-sparse 8-bit attention: which key blocks each query tile visits, chosen from pooled q and k.

Per batch, head and query tile (the kernel's block_m rows): the tile's mean query against each key block's mean
key (block_n keys) gives one score per block, scaled as the softmax's; the blocks are kept in descending softmax
mass of those scores until the kept mass reaches `keep`. Always kept: the first `sink` key blocks (attention
sinks), and in self-attention (Nq == Nk) the blocks holding the tile's own tokens, so no row is left without a
key. Causal attention never keeps a block wholly above the diagonal. The kernel then runs the kept blocks exactly
as the dense kernel runs all of them (same quantization, same online softmax over those keys) and skips the rest
at no cost; the skipped blocks' mass is dropped from the softmax, which `keep` (and calibration, measuring the
error on the model's own q and k) bounds.

The scores are computed a few heads at a time so the selection's temporaries stay under CHUNK_BYTES.
"""
import math
import threading
from dataclasses import dataclass

import torch

from ._counters import note_density as _note_process_density
from .schedule import parse_sparse

CHUNK_BYTES = 64 << 20
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
