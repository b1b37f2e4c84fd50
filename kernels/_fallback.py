"""What runs when the 8-bit path cannot: exact attention through the SDPA that existed before us, and the record
of kernel failures.

* `exact_sdpa` is `F.scaled_dot_product_attention` as it was when the pack was first imported in this process.
  Users install `sage_sdpa` globally (`F.scaled_dot_product_attention = sage_sdpa`); every exact call of ours goes
  here, so a fallback never re-enters `sage_sdpa`.
* A failure inside the 8-bit path (compile, launch, resources, a Triton API an old release lacks) is recorded per
  config (`failed`, `record`): the call and every later call of that config run exact attention instead of paying
  for the failure again, the first one is logged with the exception text, and `doctor` lists them all.
* Success is recorded too (`worked`, `note_worked`), per config and kernel path: a call that hands its only
  references to q, k, v over (ComfyUI core's containers, `_api.forward_taking`) lets each 16-bit tensor go as soon
  as its 8-bit copy exists only where the kernel already ran in this process, because a failure after that point
  can no longer fall back to exact attention on them.
* `COMFY_SAGE_STRICT=1` raises instead (the test suite sets it, so a broken kernel fails its tests rather than
  passing on the fallback's exact output).
"""
import logging
import math
import os
import sys
import threading
import types

import torch
import torch.nn.functional as F

log = logging.getLogger("comfy_sage")
STRICT_ENV = "COMFY_SAGE_STRICT"
# counter paths of calls that meant to run 8-bit and ran exact SDPA instead
KERNEL_ERROR, OUT_OF_MEMORY = "sdpa:kernel_error", "sdpa:out_of_memory"
# a kernel failure after q and k were released: exact attention on their 8-bit copies (_api._salvage)
KERNEL_ERROR_8BIT = "sdpa:kernel_error_8bit_inputs"

# One store per process, as the counters' (the pack can be imported under two module names at once).
_store = sys.modules.setdefault("_comfy_sage_fallback", types.ModuleType("_comfy_sage_fallback"))
if not hasattr(_store, "sdpa"):
    _store.sdpa, _store.lock, _store.failures = F.scaled_dot_product_attention, threading.Lock(), {}
if not hasattr(_store, "worked"):
    _store.worked = set()
exact_sdpa = _store.sdpa

# Bounds the fp32 scores of the exact-with-LSE path: query chunks of at most this many score elements.
_LSE_CHUNK_ELEMS = 1 << 26


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "0") not in ("", "0")


def failed(config: tuple) -> str | None:
    """The recorded failure of `config`, or None."""
    return _store.failures.get(config)


def record(config: tuple, exc: BaseException) -> str:
    """Remember that `config` failed with `exc`; log it once (with the exception text). Returns the text."""
    text = f"{type(exc).__name__}: {exc}".strip()
    if len(text) > 600:
        text = text[:600] + " ..."
    with _store.lock:
        first = config not in _store.failures
        _store.failures[config] = text
    if first:
        log.warning("comfy_sage: the 8-bit kernel failed for %s, so these calls run exact SDPA from now on: %s",
                    describe(config), text)
    return text


def worked(key: tuple) -> bool:
    """Whether the kernel has run `key` (a config and the kernel path it took) in this process."""
    return key in _store.worked


def note_worked(key: tuple) -> None:
    if key not in _store.worked:
        with _store.lock:
            _store.worked.add(key)


def failures() -> dict[str, str]:
    """{config description: exception text} of every failure recorded in this process."""
    with _store.lock:
        return {describe(c): t for c, t in _store.failures.items()}


def forget() -> None:
    """Clear the record, of failures and of successes (tests; a user who fixed their install may also call it instead
    of restarting)."""
    with _store.lock:
        _store.failures.clear()
        _store.worked.clear()


def describe(config: tuple) -> str:
    return " ".join(str(x) for x in config)


def exact_attention(q, k, v, layout, is_causal, scale, return_lse):
    """Exact attention with `sage_attention`'s arguments and results: (out in q's layout, contiguous; LSE [B, H, N]
    fp32 or an empty tensor)."""
    qh, kh, vh = (t if layout == "HND" else t.transpose(1, 2) for t in (q, k, v))
    if return_lse:
        out, lse = exact_with_lse(qh, kh, vh, None, is_causal, scale)
    else:
        gqa = {"enable_gqa": True} if kh.shape[1] != qh.shape[1] else {}
        out, lse = exact_sdpa(qh, kh, vh, is_causal=is_causal, scale=scale, **gqa), q.new_empty(0, dtype=torch.float32)
    out = out if layout == "HND" else out.transpose(1, 2)
    return out.contiguous(), lse


def exact_with_lse(q, k, v, attn_mask, is_causal, scale):
    """Exact attention and its natural-log LSE in fp32 math. q: [B, H, Nq, D], k/v: [B, Hkv, Nk, D] (HND).
    Returns out [B, H, Nq, D] in q's dtype and lse [B, H, Nq] fp32. Processed in query chunks to bound memory;
    fully masked rows give a zero output and an LSE of -inf."""
    B, H, Nq, D = q.shape
    Nk = k.shape[-2]
    if k.shape[1] != H:
        k = k.repeat_interleave(H // k.shape[1], dim=1)
        v = v.repeat_interleave(H // v.shape[1], dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kf, vf = k.float(), v.float()
    chunk = max(1, _LSE_CHUNK_ELEMS // max(1, B * H * Nk))
    outs, lses = [], []
    for s0 in range(0, Nq, chunk):
        s1 = min(Nq, s0 + chunk)
        s = torch.matmul(q[:, :, s0:s1].float(), kf.transpose(-1, -2)) * scale
        if is_causal:
            rows = torch.arange(s0, s1, device=q.device)[:, None]
            cols = torch.arange(Nk, device=q.device)[None, :]
            s = s.masked_fill(cols > rows, float("-inf"))
        if attn_mask is not None:
            m = attn_mask if attn_mask.shape[-2] == 1 else attn_mask[..., s0:s1, :]
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[..., None]).nan_to_num_(0.0)
        outs.append(torch.matmul(p, vf))
        lses.append(lse)
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)
