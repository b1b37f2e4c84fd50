"""`sage_attention`: argument checks, layout handling, the custom op and its straight-through backward."""
import functools
import math

import torch

from . import _arch, _fallback
from ._counters import count
from ._ops import custom_op

LAYOUTS = ("HND", "NHD")
PV_CHOICES = ("auto", "fp16", "fp8", "fine", "int8")
# "fine": FP16 P·V with one K scale per token instead of per key block, the most accurate 8-bit variant (a
# multiply more per score): what calibration tries before exact attention.
# "int8": INT8 P·V (unsigned P at each key block's row max, V per key block and channel), per-token K scales: kernel
# v10's candidate (bench/NOTES.md), the 8-bit rate on every arch. Every pv but "fp8" rotates q and k by a
# block-Hadamard matrix in the quantization pass (_quant.rotation_for).
# "sparse:keep=F" / "sparse:ratio=F": the block-sparse kernel (_sparse.py) on the arch's sparse_pv path.
MAX_HEAD_DIM = 256


def check_pv(pv):
    """The _sparse.Sparsity a "sparse:..." variant asks for, None for a dense pv; ValueError names a bad one."""
    if isinstance(pv, str) and pv.startswith("sparse:"):
        from ._sparse import from_variant

        return from_variant(pv)
    if pv not in PV_CHOICES:
        raise ValueError(f"unknown pv {pv!r}: use one of {', '.join(PV_CHOICES)}, or sparse:keep=F / "
                         "sparse:ratio=F")
    return None


def check_args(q, k, v, layout, pv, scale):
    """Raise TypeError/ValueError naming what is wrong with a call; return (B, Hq, Hkv, Nq, Nk, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: use 'HND' ([B, H, N, D]) or 'NHD' ([B, N, H, D])")
    check_pv(pv)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 ({layout}: "
                             f"{'[B, H, N, D]' if layout == 'HND' else '[B, N, H, D]'}), got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} has dtype {t.dtype}: sage_attention takes float16, bfloat16 or float32")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} has dtype {t.dtype}: sage_attention takes float16, bfloat16 or float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"mixed dtypes: q {q.dtype}, k {k.dtype}, v {v.dtype}; cast them to one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    h_ax, n_ax = (1, 2) if layout == "HND" else (2, 1)
    B, Hq, Nq, D = q.shape[0], q.shape[h_ax], q.shape[n_ax], q.shape[3]
    Hkv, Nk = k.shape[h_ax], k.shape[n_ax]
    if not (k.shape[0] == v.shape[0] == B):
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if v.shape[h_ax] != Hkv:
        raise ValueError(f"k and v have different head counts: {Hkv} and {v.shape[h_ax]}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q has {Hq} heads, not a multiple of k/v's {Hkv} (grouped-query attention needs Hq % Hkv == 0)")
    if v.shape[n_ax] != Nk:
        raise ValueError(f"k and v have different sequence lengths: {Nk} and {v.shape[n_ax]}")
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"head dims differ: q {D}, k {k.shape[3]}, v {v.shape[3]}; sage_attention needs one head dim "
                         "(sage_sdpa falls back to SDPA for different v head dims)")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} is not supported (1 to {MAX_HEAD_DIM}); sage_sdpa falls back to SDPA for it")
    if Nk == 0:
        raise ValueError("k and v have no tokens (N = 0): attention over nothing is undefined")
    if scale is not None:
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a finite positive number, got {scale!r}")
    return B, Hq, Hkv, Nq, Nk, D


def _to_hnd(t, layout):
    """A [B, H, N, D] view (no copy) of either layout; copies only when the last dim is not contiguous."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t if layout == "HND" else t.transpose(1, 2)


def _warp_specialized(tile, causal, pv, D, DP, config=(), v=None):
    """The warp-specialized sm90 kernel's module where a call runs it (its tile names one, for causal calls too
    where the call is causal, FP8 or FP16 P·V, a head dim needing no padding, bulk copies, a 16-bit `v` whose rows
    the bulk-copy engine takes, a Triton it was measured with: _attention_ws.usable, and it has not failed here
    before), else None."""
    if (tile.ws is None or (causal and not tile.ws.causal) or pv not in ("fp8", "fp16") or D != DP or not tile.tma
            or _fallback.failed(("ws", *config))):
        return None
    try:
        from . import _attention_ws
    except Exception as e:  # noqa: BLE001 - a Triton without Gluon, or with another Gluon API: the Triton kernel
        _fallback.record(("ws", *config), e)
        return None
    if pv == "fp16" and (v is None or not _attention_ws.takes(v)):
        return None
    return _attention_ws if _attention_ws.usable() else None


def _forward(q, k, v, layout, is_causal, scale, pv, return_lse, tile=None, sparse=None):
    """The op's implementation: checks, then the 8-bit kernel, or exact attention where the kernel failed on this
    config (`_fallback`). `tile` overrides the arch table (benchmark sweeps only; failures then raise). `sparse`
    (a _sparse.Request, or a pv "sparse:..."): visit only the key blocks its selection keeps, and set its density."""
    return _run([q, k, v], layout, is_causal, scale, pv, return_lse, tile, sparse)


def forward_taking(qkv: list, is_causal=False, scale=None, pv="auto", return_lse=False, sparse=None):
    """`_forward` on [q, k, v] ([B, H, N, D] each, HND) handed over in a list that holds their only references (what
    ComfyUI core's containers give), which it empties. Where the kernel has already run this config in this process
    (`_fallback.worked`), each 16-bit tensor is released as soon as its 8-bit copy exists (`_quant.quantize_taking`):
    q, then k, then v where P·V is 8-bit (fp8, int8; the 16-bit P·V reads v to the end), and the output is allocated
    after them, so that the call's peak is q+k+v and q's 8-bit copy, under SDPA's q+k+v and output. Elsewhere (the
    config's first call, fp32 inputs) it holds them until the kernel returns, so that a failure can still fall back to
    exact attention on them, as `_forward` does. A sparse call selects its key blocks from the 16-bit q and k first.
    No autograd: callers use the op where gradients or torch.compile are involved (`_sdpa.sdpa_taking`)."""
    try:
        return _run(qkv, "HND", is_causal, scale, pv, return_lse, sparse=sparse, owned=True)
    finally:
        qkv.clear()


def _path_key(config, v, pv):
    """What a success is remembered under (`_fallback.note_worked`): the config, and on the 16-bit P·V path which of
    the attention kernel's two compiled paths reads v (bulk copies need 16-byte aligned rows: _attention._descriptors;
    a v strided in its last dim is copied first)."""
    if pv in ("fp8", "int8"):
        return config
    if v.stride(-1) != 1:
        return (*config, "v:copied")
    return (*config, "v:aligned" if _arch.bulk_copyable(v) else "v:unaligned")


def _run(qkv: list, layout, is_causal, scale, pv, return_lse, tile=None, sparse=None, owned=False):
    shape = B, Hq, Hkv, Nq, Nk, D = check_args(*qkv, layout, pv, scale)
    if sparse is None and pv.startswith("sparse:"):
        from ._sparse import Request

        sparse, pv = Request(check_pv(pv)), "auto"
    entry = _arch.arch_of(qkv[0].device)
    if entry is None:
        raise ValueError(f"sage_attention needs a CUDA GPU of sm80 or newer (got {qkv[0].device}); on CPU set "
                         "TRITON_INTERPRET=1 to run the Triton kernels, or call sage_sdpa for an exact fallback")
    if pv == "auto":
        pv = entry.sparse_pv if sparse else entry.pv_for(D, is_causal)
    if pv == "fp8" and not entry.fp8:
        raise ValueError(f"pv='fp8' needs FP8 tensor cores (sm89 or newer); this GPU is {entry.name}: use pv='fp16'")
    # what one compilation serves: failures are remembered per config
    config = (entry.name, str(qkv[0].dtype).replace("torch.", ""), f"D={D}", pv, "causal" if is_causal else "full",
              layout, *(("lse",) if return_lse else ()), *(("sparse",) if sparse else ()))
    if tile is not None:  # a benchmark's tile: failures raise
        return _kernel(qkv, layout, is_causal, scale, pv, return_lse, entry, config, shape, tile, sparse)
    failure = None
    if _fallback.failed(config) is None:
        key = _path_key(config, qkv[2], pv)
        release = owned and qkv[0].dtype != torch.float32 and _fallback.worked(key)
        try:
            result = _kernel(qkv, layout, is_causal, scale, pv, return_lse, entry, config, shape, sparse=sparse,
                             release=release)
        except torch.cuda.OutOfMemoryError:
            # After a release (q is gone) an out-of-memory error propagates, as SDPA's own would: every allocation
            # after it (k's and v's 8-bit copies, the output) fits in less than the 16-bit tensors it freed, so live
            # memory plus the failed request is below SDPA's q+k+v+output at every point; SDPA could not have run this
            # call either. Before a release (q's 8-bit copy, the first allocation) exact attention is tried, as always.
            if _fallback.strict() or any(t is None for t in qkv):
                raise
            failure = _fallback.OUT_OF_MEMORY, "the 8-bit path's buffers did not fit; SDPA needs none"
        except Exception as e:  # noqa: BLE001 - compile, launch, resources, Triton API: never the user's workflow
            if _fallback.strict():
                raise
            _fallback.record(config, e)
            # After a release only the quantization launches of k and v can fail here (the attention launch salvages
            # its own failure: _salvage), and they run the binary q's launch has just run
            if any(t is None for t in qkv):
                raise
            failure = _fallback.KERNEL_ERROR, "the 8-bit kernel failed on this config (see the log or `doctor`)"
        else:
            _fallback.note_worked(key)
            return result
    # Out of the except clauses, whose exception's traceback kept the failed call's buffers (its frames' locals)
    # alive: exact attention gets that memory back.
    count(*(failure or (_fallback.KERNEL_ERROR, "the 8-bit kernel failed on this config (see the log or `doctor`)")))
    return _fallback.exact_attention(*qkv, layout, is_causal, scale, return_lse)


def _kernel(qkv, layout, is_causal, scale, pv, return_lse, entry, config, shape, tile=None, sparse=None,
            release=False):
    """The 8-bit path on qkv = [q, k, v] in `layout`. `release` (HND; the list holds the only references): each
    16-bit tensor leaves the list once its 8-bit copy is queued (`_quant.quantize_taking`), and the output is
    allocated after that; the 16-bit v stays where P·V reads it."""
    B, Hq, Hkv, Nq, Nk, D = shape
    from . import _attention, _quant  # triton is imported at first use, not with the package

    DP = _arch.head_dim_bucket(D)
    k_token = pv in ("fine", "int8")
    tile = tile or entry.tiles[(DP, "fp16" if pv == "fine" else pv)]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    fp8_v, int8_v = pv == "fp8", pv == "int8"
    out_shape, dtype, device = qkv[0].shape, qkv[0].dtype, qkv[0].device
    if release:  # HND already; a last dim that is not contiguous is copied, and the copy replaces the tensor
        hnd = qkv
        hnd[:] = [_to_hnd(t, "HND") for t in hnd]
    else:
        hnd = [_to_hnd(t, layout) for t in qkv]
    if not (fp8_v or int8_v) and hnd[2].dtype == torch.float32:  # never with release (16-bit inputs only)
        hnd[2] = hnd[2].to(torch.bfloat16)  # 16-bit P·V for fp32 inputs: bf16 keeps fp32's range
    # v's strides, for the kernel's arguments where v itself is gone (8-bit P·V reads the 8-bit copy)
    v_meta = torch.empty_strided(hnd[2].shape, hnd[2].stride(), dtype=hnd[2].dtype, device="meta")
    dims = (B, Hq, Hkv, Nq, Nk, D, DP)
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=device) if return_lse else None
    density = None
    if not Nq:
        out = torch.empty(out_shape, dtype=dtype, device=device)
    else:
        blocks = None
        if sparse:  # from the 16-bit q and k, before they go
            from . import _sparse

            *blocks, density = _sparse.select(hnd[0], hnd[1], block_m=tile.block_m, block_n=tile.block_n,
                                              causal=is_causal, scale=scale, sparsity=sparse.sparsity)
        quant = dict(dims=dims, scale=scale, block_m=tile.block_m, block_n=tile.block_n, fp8_v=fp8_v, k_token=k_token,
                     lse=lse, int8_v=int8_v, rot=_quant.rotation_for(pv, D), maxnreg=entry.quant_cap(DP))
        qz = _quant.quantize_taking(hnd, **quant) if release else _quant.quantize(*hnd, **quant)
        out = torch.empty(out_shape, dtype=dtype, device=device)  # after the 16-bit tensors that went
        vh = v_meta if hnd[2] is None else hnd[2]
        triton_kernel = functools.partial(
            _attention.attention, qz, vh, _to_hnd(out, layout), lse, dims=dims, block_m=tile.block_m,
            block_n=tile.block_n, causal=is_causal, fp8_v=fp8_v, k_token=k_token, int8_v=int8_v,
            num_warps=tile.num_warps,
            num_stages=tile.num_stages, tma=tile.tma, maxnreg=tile.maxnreg, pointer_maxnreg=tile.pointer_maxnreg,
            sparse=blocks)
        ws_kernel = None if sparse else _warp_specialized(tile, is_causal, pv, D, DP, config, hnd[2])
        try:
            if ws_kernel is None:
                triton_kernel()
            else:
                try:
                    ws_kernel.attention(qz, _to_hnd(out, layout), lse, dims=dims, block_m=tile.block_m,
                                        block_n=tile.block_n, consumers=tile.ws.consumers, stages=tile.ws.stages,
                                        maxnreg=tile.ws.maxnreg, v=None if fp8_v else vh, causal=is_causal,
                                        ctas=tile.ws.ctas)
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as e:  # noqa: BLE001 - the Triton kernel does the same work
                    if _fallback.strict():
                        raise
                    _fallback.record(("ws", *config), e)
                    triton_kernel()
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - see _salvage
            if not release or _fallback.strict():
                raise
            _fallback.record(config, e)
            failed = True
        else:
            failed = False
        if failed:  # out of the except clause, so that its traceback frees the failed launch's arguments
            count(_fallback.KERNEL_ERROR_8BIT, "the 8-bit kernel failed after q and k were released: exact "
                  "attention on their 8-bit copies (see the log or `doctor`)")
            _salvage(qz, hnd[2], _to_hnd(out, layout), lse, dims, tile.block_n, is_causal, fp8_v, int8_v, k_token)
            return out, lse if lse is not None else out.new_empty(0, dtype=torch.float32)
    if sparse:
        from . import _sparse

        sparse.density = density
        _sparse.note_density(density)
    count("int8-sparse" if sparse else "int8-fine" if pv == "fine" else f"int8-{pv}pv")
    return out, lse if lse is not None else out.new_empty(0, dtype=torch.float32)


def _salvage(qz, v, out, lse, dims, block_n, is_causal, fp8_v, int8_v, k_token):
    """Exact attention on the 8-bit copies of q, k (and v, where P·V is 8-bit; else the 16-bit v), written into
    `out` ([B, Hq, Nq, D] view) and added into `lse`: what a call does whose attention launch failed after it released
    q and k (`forward_taking`), which therefore cannot run exact attention on them. As accurate as the 8-bit kernel
    (the same quantized inputs, exact softmax and P·V in fp32). One head of k and v at a time, so that the
    dequantized copies stay a fraction of the 8-bit ones. qs carries the softmax scale times log2(e) (and the
    rotation's 1/ROT, which the rotated q·k needs): scores in log2 units, softmax at scale ln(2). K's smoothing
    shifts each row's scores by one amount, which softmax ignores and the quantization already put into `lse`."""
    B, Hq, Hkv, Nq, Nk, D, DP = dims
    g = Hq // Hkv
    n = torch.arange(Nk, device=out.device)
    from ._quant import v_slot

    slot = v_slot.fn(n)  # where key n sits in v8 (the jit function's Python body, on torch tensors)
    dtype = torch.float32  # the scaled 8-bit values exactly, at any range (SDPA's memory-efficient kernel on GPUs)
    for b in range(B):
        for hk in range(Hkv):
            hs = slice(hk * g, (hk + 1) * g)
            q = (qz.q8[b, hs, :Nq, :D].float() * qz.qs[b, hs, :Nq, None]).to(dtype)
            ks = qz.ks[b, hk, :Nk] if k_token else qz.ks[b, hk, n // block_n, (n % 8) // 2]
            k = (qz.k8[b, hk, :Nk, :D].float() * ks[:, None]).to(dtype)
            if fp8_v:
                vv = (qz.v8[b, hk][:, slot].float().T * qz.vs[b, hk, :D]).to(dtype)
            elif int8_v:
                vv = (qz.v8[b, hk][:, slot].float().T * qz.vs[b, hk, n // block_n].float()).to(dtype)
            else:
                vv = v[b, hk].to(dtype)
            k, vv = k[None].expand(g, Nk, D), vv[None].expand(g, Nk, D)
            if lse is None:
                o = _fallback.exact_sdpa(q, k, vv, is_causal=is_causal, scale=math.log(2.0))
            else:
                o, part = _fallback.exact_with_lse(q[None], k[None], vv[None], None, is_causal, math.log(2.0))
                o, lse[b, hs] = o[0], lse[b, hs] + part[0]
            out[b, hs] = o.to(out.dtype)


def _impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, is_causal: bool, scale: float,
          pv: str, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, layout, is_causal, scale if scale > 0 else None, pv, return_lse)


def _fake(q, k, v, layout, is_causal, scale, pv, return_lse):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if not return_lse:
        return out, q.new_empty(0, dtype=torch.float32)
    B, H, N = (q.shape[0], q.shape[1], q.shape[2]) if layout == "HND" else (q.shape[0], q.shape[2], q.shape[1])
    return out, q.new_empty((B, H, N), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, layout, is_causal, scale, pv, return_lse = inputs
    ctx.save_for_backward(q, k, v)
    ctx.layout, ctx.is_causal, ctx.scale = layout, is_causal, scale


def _backward(ctx, grad_out, grad_lse):
    """Straight-through: gradients of exact attention (and of its LSE), recomputed in the inputs' dtype."""
    q, k, v = ctx.saved_tensors
    with torch.enable_grad():
        qh, kh, vh = (_to_hnd(t, ctx.layout).detach().requires_grad_(t.requires_grad) for t in (q, k, v))
        scale = ctx.scale if ctx.scale > 0 else 1.0 / math.sqrt(q.shape[-1])
        group = qh.shape[1] // kh.shape[1]
        out = _fallback.exact_sdpa(qh, kh, vh, is_causal=ctx.is_causal, scale=scale,
                                   enable_gqa=bool(group > 1))  # a SymBool under dynamic shapes
        outs, grads = [out], [_to_hnd(grad_out, ctx.layout)]
        if grad_lse is not None and grad_lse.numel() and bool(grad_lse.ne(0).any()):
            kk = kh.repeat_interleave(group, dim=1) if group > 1 else kh
            s = (qh.float() @ kk.float().transpose(-1, -2)) * scale
            if ctx.is_causal:
                n, m = s.shape[-2:]
                s = s.masked_fill(torch.ones(n, m, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
            outs.append(torch.logsumexp(s, dim=-1))
            grads.append(grad_lse)
        need = [t for t in (qh, kh, vh) if t.requires_grad]
        got = iter(torch.autograd.grad(outs, need, grads))
        res = [(_to_hnd(next(got), ctx.layout) if t.requires_grad else None) for t in (qh, kh, vh)]
    return (*res, None, None, None, None, None)


_op = custom_op("sage_attention", _impl, _fake, (_backward, _setup_context))


def sage_attention(q, k, v, *, layout="HND", is_causal=False, scale=None, return_lse=False, pv="auto"):
    """8-bit attention (INT8 Q·Kᵀ; FP8, INT8 or FP16 P·V).

    q: [B, Hq, Nq, D] (layout="HND") or [B, Nq, Hq, D] ("NHD"); k, v: [B, Hkv, Nk, D] with Hq % Hkv == 0.
    fp16/bf16 in → same dtype out; fp32 in → computed in 8/16-bit, returned as fp32. Causal masking follows
    SDPA (query i sees keys j <= i). With return_lse, also returns the natural-log LSE [B, Hq, Nq] in fp32.
    pv: "fp16" (16-bit P·V in the input's dtype), "fp8" (sm89+; the one path whose q and k are not rotated),
    "auto" (per-arch table and head dim), "fine" (FP16 P·V and per-token K scales: the most accurate 8-bit variant,
    which calibration picks before exact attention), or "int8" (INT8 P·V with per-block V scales and per-token K
    scales), or
    "sparse:keep=F" / "sparse:ratio=F" (`sparse_attention` at that level, on the arch's sparse P·V path).
    """
    check_args(q, k, v, layout, pv, scale)
    out, lse = _op(q, k, v, layout, bool(is_causal), float(scale) if scale is not None else 0.0, pv,
                   bool(return_lse))
    return (out, lse) if return_lse else out
