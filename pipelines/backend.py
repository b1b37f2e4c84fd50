"""comfy_sage as a diffusers attention backend.

Two routes into a diffusers model, chosen per attention module:

* Models whose processors call diffusers' `dispatch_attention_fn` (Wan, Flux, HunyuanVideo, LTX, QwenImage...):
  we register backends in diffusers' attention registry under new `AttentionBackendName` members and point each
  processor's `_attention_backend` at one of them. They accept diffusers' `ContextParallelConfig` (Ulysses and
  ring): under context parallelism the templated CP attention calls our forward op, which returns the
  natural-log LSE ring attention merges.
* Models whose processors call `F.scaled_dot_product_attention` themselves (CogVideoX, SD3): the processor is
  wrapped so that, for the duration of its call on this thread, SDPA is answered by `sage_sdpa`.

Backend names (usable with `diffusers.attention_backend(...)` and `model.set_attention_backend(...)` once
`register_backends()` ran — importing `comfy_sage.pipelines` runs it):

    comfy_sage        8-bit attention, P·V precision from the GPU's table ("auto")
    comfy_sage_fp16   8-bit Q·K, FP16 P·V
    comfy_sage_fp8    8-bit Q·K, FP8 P·V (sm89+)
    comfy_sage_fine   8-bit Q·K with per-token K scales, FP16 P·V (what calibration picks before exact)
    comfy_sage_int8   8-bit Q·K with per-token K scales and Hadamard-rotated Q, K; INT8 P·V
    comfy_sage_exact  exact attention (SDPA, or fp32 math when an LSE is needed): what a schedule uses where it
                      keeps full precision, and still context-parallel capable
    comfy_sage_sparse_keep_0_9, comfy_sage_sparse_ratio_0_25, ...: block-sparse 8-bit attention at one level,
                      registered on first use (`backend_member("sparse:keep=0.9")`, what enable_sage's `sparse` sets
                      at self-attention sites)

A sparse backend runs the sparse kernel where its call allows it; a call that needs an LSE (ring attention) runs the
dense 8-bit kernel instead: a sparse selection is made over the keys one call sees, and ring attention's calls see a
slice of them.

Masks are never dropped. A boolean key-padding mask (HunyuanVideo's prompt padding) is honoured by leaving the
masked keys out of the call, so the 8-bit kernel runs; any other mask runs exact SDPA with the mask (counted as
`sdpa:mask`).
"""
from __future__ import annotations

import contextlib
import functools
import math
import re
import threading

import torch
import torch.nn.functional as F

from ..kernels import exact_sdpa, sage_attention, sage_sdpa
from ..kernels import count, fallback_reason  # the same counters `kernels.counters()` reports
from ..kernels._fallback import exact_with_lse
from ..kernels.schedule import sparse_variant

STATIC_BACKENDS = {
    "comfy_sage": "auto",
    "comfy_sage_fp16": "fp16",
    "comfy_sage_fp8": "fp8",
    "comfy_sage_fine": "fine",  # FP16 P·V and per-token K scales: what calibration picks before exact
    "comfy_sage_int8": "int8",
    "comfy_sage_exact": None,
}
# every backend registered so far, sparse levels included (they are added on first use)
PV_BY_BACKEND = dict(STATIC_BACKENDS)
BACKEND_BY_PV = {pv: name for name, pv in PV_BY_BACKEND.items()}
PV_CHOICES = ("auto", "fp16", "fp8", "int8", "fine")


def check_pv(pv) -> str:
    """pv itself (a sparse variant normalized: "sparse:keep=0.90" -> "sparse:keep=0.9"); ValueError names a bad one."""
    if isinstance(pv, str) and pv.startswith("sparse:"):
        try:
            return sparse_variant(pv[len("sparse:"):])
        except ValueError as e:
            raise ValueError(f"unknown pv {pv!r}: {e}") from None
    if pv not in PV_CHOICES:
        raise ValueError(f"unknown pv {pv!r}: use one of {', '.join(PV_CHOICES)}, or sparse:keep=F / sparse:ratio=F")
    return pv


def is_sparse(pv) -> bool:
    return isinstance(pv, str) and pv.startswith("sparse:")


def dense_pv(pv):
    """The dense 8-bit variant that serves a call a sparse variant cannot ("auto"); pv itself otherwise."""
    return "auto" if is_sparse(pv) else pv


# ----------------------------------------------------------------------------------------------------------------
# Attention math shared by both routes. Inputs here are diffusers' layout: [B, N, H, D].
# ----------------------------------------------------------------------------------------------------------------

def _normalize_mask(attn_mask, query, key):
    """diffusers passes key-padding masks as [B, Nk]; SDPA wants something broadcastable to [B, H, Nq, Nk]."""
    if attn_mask is not None and attn_mask.ndim == 2 and attn_mask.shape == (query.shape[0], key.shape[1]):
        attn_mask = attn_mask[:, None, None, :]
    return attn_mask


def kept_keys(attn_mask, q, k):
    """For a boolean key-padding mask ([B or 1, 1, 1, Nk]: which keys every query of a batch row may see; what
    HunyuanVideo passes to every joint attention, and QwenImage with a padded prompt), the kept key indices per
    batch row: a list of B index tensors (None = all keys), or None when the mask is anything else."""
    if (attn_mask is None or attn_mask.dtype != torch.bool or attn_mask.dim() != 4 or attn_mask.shape[1:3] != (1, 1)
            or attn_mask.shape[-1] != k.shape[-2] or attn_mask.shape[0] not in (1, q.shape[0])
            or torch.compiler.is_compiling()):
        return None
    keep = attn_mask[:, 0, 0, :].expand(q.shape[0], -1)
    if bool(keep.all()):
        return [None] * q.shape[0]
    return [row.nonzero().squeeze(1) for row in keep]


def _attend_kept_keys(q, k, v, kept, attn_mask, scale, kwargs, pv):
    """Masked keys dropped instead of masked: the same softmax, so the 8-bit kernel can run. One call per batch
    row whose kept keys differ from the previous row's; a row that keeps no key runs exact SDPA (its mask says so)."""
    outs, b0 = [], 0
    for b in range(1, q.shape[0] + 1):
        if b < q.shape[0] and (kept[b] is None) == (kept[b0] is None) and (
                kept[b] is None or torch.equal(kept[b], kept[b0])):
            continue
        rows, idx = slice(b0, b), kept[b0]
        qb, kb, vb = q[rows], k[rows], v[rows]
        if idx is not None and idx.numel() == 0:
            m = attn_mask[rows] if attn_mask.shape[0] > 1 else attn_mask
            count("sdpa:mask", "an attention mask is given (the 8-bit kernel takes none)")
            outs.append(exact_sdpa(qb, kb, vb, attn_mask=m, scale=scale, **kwargs))
        else:
            if idx is not None:
                n = idx.numel()
                if int(idx[-1]) == n - 1:  # a prefix (padding at the end): a view, no copy
                    kb, vb = kb[:, :, :n], vb[:, :, :n]
                else:
                    kb, vb = kb.index_select(2, idx), vb.index_select(2, idx)
            outs.append(sage_sdpa(qb, kb, vb, scale=scale, pv=pv, **kwargs))
        b0 = b
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def attend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
           *, pv):
    """Attention on [B, N, H, D]; pv=None is exact SDPA, else `sage_sdpa` (8-bit where it applies). A boolean
    key-padding mask is honoured by dropping the masked keys (exact: they get zero weight either way), so the
    8-bit kernel still runs; any other mask runs exact SDPA with the mask (`sdpa:mask`)."""
    attn_mask = _normalize_mask(attn_mask, query, key)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    if pv is not None and not dropout_p and not is_causal:
        kept = kept_keys(attn_mask, q, k)
        if kept is not None:
            return _attend_kept_keys(q, k, v, kept, attn_mask, scale, kwargs, pv).transpose(1, 2)
    if pv is None:
        out = exact_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)
    else:
        out = sage_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        pv=pv, **kwargs)
    return out.transpose(1, 2)


def attend_with_lse(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False, *, pv):
    """(out [B, N, H, D], lse [B, N, H] fp32): the 8-bit kernel where it applies, else exact fp32 math (counted
    as `sdpa-lse:<reason>` in `kernels.counters()`; pv=None is exact by choice and not counted). A sparse pv runs
    the dense 8-bit kernel: an LSE is asked for by ring attention, whose calls see a slice of the keys, where a
    selection by pooled mass would drop different blocks per slice."""
    pv = dense_pv(pv)
    if dropout_p:
        raise ValueError("comfy_sage: dropout_p > 0 is not supported when an LSE is asked for (context parallelism "
                         "is for inference here)")
    attn_mask = _normalize_mask(attn_mask, query, key)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if pv is not None:
        why = fallback_reason(q, k, v, attn_mask, 0.0, scale, enable_gqa, is_causal)
        if why is None:
            out, lse = sage_attention(query, key, value, layout="NHD", is_causal=is_causal, scale=scale,
                                      return_lse=True, pv=pv)
            return out, lse.transpose(1, 2)
        path, reason = why
        count("sdpa-lse:" + path.split(":", 1)[-1], reason)
    if attn_mask is not None and attn_mask.shape[-1] != k.shape[-2]:
        raise ValueError(f"comfy_sage: the attention mask covers {attn_mask.shape[-1]} keys but this attention "
                         f"sees {k.shape[-2]}: diffusers' ring attention does not split masks with the keys; use "
                         "ContextParallelConfig(ulysses_degree=...) for masked models")
    out, lse = exact_with_lse(q, k, v, attn_mask, is_causal, scale)
    return out.transpose(1, 2), lse.transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------
# Context parallel ops for diffusers' templated ring / Ulysses attention
# ----------------------------------------------------------------------------------------------------------------

def _cp_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None, *, pv):
    if _save_ctx:
        ctx.save_for_backward(query, key, value)
        ctx.comfy_sage = {"attn_mask": attn_mask, "is_causal": is_causal, "scale": scale}
    if return_lse:
        return attend_with_lse(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, pv=pv)
    return attend(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, pv=pv)


def _cp_backward_op(ctx, grad_out, *args, query=None, key=None, value=None, out=None, lse=None, **kwargs):
    """Exact gradients (straight-through, like the kernel's own backward).

    Ulysses calls this with only grad_out: recompute attention on the saved (gathered) q, k, v. Ring calls it once
    per K/V chunk with the fully merged out and LSE: the chunk's share of the gradient follows from
    P = exp(S - lse) with the global LSE."""
    opts = ctx.comfy_sage
    mask = _normalize_mask(opts["attn_mask"], *ctx.saved_tensors[:2])
    if query is None:
        q, k, v = (t.detach().transpose(1, 2).requires_grad_(True) for t in ctx.saved_tensors)
        with torch.enable_grad():
            o = exact_sdpa(q, k, v, attn_mask=mask, is_causal=opts["is_causal"], scale=opts["scale"])
            gq, gk, gv = torch.autograd.grad(o, (q, k, v), grad_out.transpose(1, 2))
        return gq.transpose(1, 2), gk.transpose(1, 2), gv.transpose(1, 2)
    q, k, v, do, o = (t.transpose(1, 2).float() for t in (query, key, value, grad_out, out))
    scale = 1.0 / math.sqrt(q.shape[-1]) if opts["scale"] is None else opts["scale"]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    p = torch.exp(s - lse.transpose(1, 2).float()[..., None]).nan_to_num_(0.0)
    gv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, v.transpose(-1, -2))
    ds = p * (dp - (do * o).sum(-1, keepdim=True))
    gq = torch.matmul(ds, k) * scale
    gk = torch.matmul(ds.transpose(-1, -2), q) * scale
    return tuple(g.transpose(1, 2).to(grad_out.dtype) for g in (gq, gk, gv))


# ----------------------------------------------------------------------------------------------------------------
# Registration in diffusers' registry
# ----------------------------------------------------------------------------------------------------------------

def _add_enum_member(enum_cls, name: str, value: str):
    """Add `value` to diffusers' `AttentionBackendName` (a str Enum) so the registry, `attention_backend()` and
    `set_attention_backend()` accept it. Returns the member."""
    if value in enum_cls._value2member_map_:
        return enum_cls._value2member_map_[value]
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    if hasattr(enum_cls, "_add_member_"):  # Python 3.13+
        enum_cls._add_member_(name, member)
    else:
        enum_cls._member_map_[name] = member
    enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[value] = member
    if enum_cls(value) is not member:
        raise RuntimeError(f"comfy_sage could not add {value!r} to diffusers' AttentionBackendName on this Python")
    return member


def _make_backend(pv):
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    forward_op = functools.partial(_cp_forward_op, pv=pv)

    def backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                return_lse=False, _parallel_config=None):
        if _parallel_config is None:
            if return_lse:
                return attend_with_lse(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, pv=pv)
            return attend(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, pv=pv)
        return _templated_context_parallel_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
            forward_op=forward_op, backward_op=_cp_backward_op, _parallel_config=_parallel_config)

    backend.__name__ = "comfy_sage_backend_" + re.sub(r"\W", "_", pv or "exact")
    return backend


_members = {}  # backend name -> AttentionBackendName member, once registered
_register_lock = threading.Lock()


def _register(name: str, pv):
    member = _members.get(name)
    if member is not None:
        return member
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    with _register_lock:
        if name not in _members:
            member = _add_enum_member(AttentionBackendName, name.upper(), name)
            _AttentionBackendRegistry.register(member, constraints=[], supports_context_parallel=True)(
                _make_backend(pv))
            PV_BY_BACKEND[name], BACKEND_BY_PV[pv] = pv, name
            _members[name] = member
        return _members[name]


def register_backends() -> dict:
    """Register our fixed backends with diffusers (idempotent). Returns {name: AttentionBackendName member}."""
    return {name: _register(name, pv) for name, pv in STATIC_BACKENDS.items()}


def sparse_backend_name(pv: str) -> str:
    """"sparse:keep=0.9" -> "comfy_sage_sparse_keep_0_9": an identifier, so its enum member name is valid too."""
    return "comfy_sage_" + re.sub(r"\W", "_", check_pv(pv))


def backend_member(pv):
    """The diffusers backend enum member for pv ("auto", "fp16", "fp8", "int8", "fine", None for exact, or a sparse
    variant "sparse:keep=F" / "sparse:ratio=F", whose backend is registered on first use)."""
    name = BACKEND_BY_PV.get(pv)
    if name is None:
        pv = check_pv(pv)
        name = BACKEND_BY_PV.get(pv) or sparse_backend_name(pv)
    return _register(name, pv)


# ----------------------------------------------------------------------------------------------------------------
# Processors that call F.scaled_dot_product_attention themselves
# ----------------------------------------------------------------------------------------------------------------

_tls = threading.local()
_UNSET = object()
_patch_lock = threading.Lock()
_patch = {"depth": 0, "orig": None}


def _sdpa_shim(*args, **kwargs):
    pv = getattr(_tls, "pv", _UNSET)
    if pv is _UNSET:
        return _patch["orig"](*args, **kwargs)
    if pv is None:  # exact by the schedule, even where the user installed sage_sdpa globally
        return exact_sdpa(*args, **kwargs)
    return sage_sdpa(*args, pv=pv, **kwargs)  # its exact calls go to exact_sdpa, never back here


@contextlib.contextmanager
def redirect_sdpa(pv):
    """While active on this thread, F.scaled_dot_product_attention runs `sage_sdpa(pv=pv)` (pv=None: exact).
    Other threads keep plain SDPA."""
    prev = getattr(_tls, "pv", _UNSET)
    _tls.pv = pv
    with _patch_lock:
        if _patch["depth"] == 0:
            _patch["orig"] = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = _sdpa_shim
        _patch["depth"] += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch["depth"] -= 1
            if _patch["depth"] == 0:
                F.scaled_dot_product_attention = _patch["orig"]
                _patch["orig"] = None
        _tls.pv = prev


class SageSDPAProcessor:
    """Wraps a processor that calls F.scaled_dot_product_attention, answering those calls with sage_sdpa.

    Built per wrapped class (`wrap_sdpa_processor`) so that `inspect.signature(processor.__call__)` is the
    wrapped processor's: diffusers' `Attention.forward` filters keyword arguments (rotary embeddings...) by it."""

    def __init__(self, inner, pv):
        self.inner = inner
        self.pv = pv  # None: exact (a schedule keeps this site in full precision)

    def __call__(self, attn, *args, **kwargs):
        with redirect_sdpa(self.pv):
            return self.inner(attn, *args, **kwargs)

    def __repr__(self):
        return f"SageSDPAProcessor({type(self.inner).__name__}, pv={self.pv!r})"


@functools.cache
def _wrapper_class(inner_cls):
    import inspect

    def __call__(self, attn, *args, **kwargs):
        with redirect_sdpa(self.pv):
            return self.inner(attn, *args, **kwargs)

    __call__.__signature__ = inspect.signature(inner_cls.__call__)
    return type(f"Sage{inner_cls.__name__}", (SageSDPAProcessor,), {"__call__": __call__})


def wrap_sdpa_processor(inner, pv):
    return _wrapper_class(type(inner))(inner, pv)
