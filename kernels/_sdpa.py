"""`sage_sdpa`: a drop-in for F.scaled_dot_product_attention that runs the 8-bit kernel where it applies and is
faster, and SDPA itself (exactly) everywhere else, counting why."""
import torch

from . import _arch
from ._api import MAX_HEAD_DIM, _op, forward_taking
from ._counters import count
from ._fallback import exact_sdpa

# Below 16 the 8-bit MMA (32 deep) mostly multiplies padding, and per-row scales outweigh what 8 bits save: the
# buffers would pass 0.6x q+k+v.
MIN_SDPA_HEAD_DIM = 16


def fallback_reason(query, key, value, attn_mask=None, dropout_p=0.0, scale=None, enable_gqa=False,
                    is_causal=False):
    """None when the 8-bit kernel applies; else (counter path, reason)."""
    if attn_mask is not None:
        return "sdpa:mask", "an attention mask is given (the 8-bit kernel takes none)"
    if dropout_p:
        return "sdpa:dropout", "dropout_p > 0"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "sdpa:rank", "inputs are not [B, H, N, D]"
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in (torch.float16, torch.bfloat16,
                                                                             torch.float32):
        return "sdpa:dtype", f"dtype {query.dtype}/{key.dtype}/{value.dtype}"
    if query.dtype == torch.float32:
        return "sdpa:fp32", "fp32 inputs ask for full precision"
    if not (query.device == key.device == value.device):
        return "sdpa:device", "tensors on different devices"
    D = query.shape[-1]
    if key.shape[-1] != D or value.shape[-1] != D or not MIN_SDPA_HEAD_DIM <= D <= MAX_HEAD_DIM:
        return "sdpa:head_dim", f"head dim {D} (v {value.shape[-1]}) is outside what the kernel takes or gains on"
    if key.shape[1] != value.shape[1] or key.shape[-2] != value.shape[-2] or key.shape[0] != query.shape[0]:
        return "sdpa:shape", "mismatched shapes (SDPA reports the error)"
    Hq, Hkv = query.shape[1], key.shape[1]
    if Hq != Hkv and not (enable_gqa and Hkv and Hq % Hkv == 0):
        return "sdpa:shape", "head counts differ without enable_gqa"
    if key.shape[-2] == 0:
        return "sdpa:empty", "no keys"
    if scale is not None and not scale > 0:
        return "sdpa:scale", "non-positive scale"
    entry = _arch.arch_of(query.device)
    if entry is None:
        if query.device.type == "cpu":
            return "sdpa:cpu", "CPU tensors"
        return "sdpa:gpu", "GPU without INT8 tensor cores (needs sm80+)"
    below = entry.sdpa_below(D, is_causal)
    pairs = query.shape[-2] * key.shape[-2]
    if pairs < below:
        return "sdpa:short", f"sequence too short to gain on {entry.name} (< {below} query-key pairs)"
    if pairs * query.shape[0] * Hq < entry.min_total_pairs:
        return "sdpa:short", f"too little work to gain on {entry.name} (< {entry.min_total_pairs} query-key pairs " \
                             "over batch and heads)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "sdpa:no_triton", "triton is not installed"
    return None


def sage_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
              *, pv="auto"):
    """Same arguments and result as F.scaled_dot_product_attention ([B, H, N, D] inputs). Safe to install
    globally (`F.scaled_dot_product_attention = sage_sdpa`): its exact calls go to the SDPA that was there
    before (`_fallback.exact_sdpa`)."""
    why = fallback_reason(query, key, value, attn_mask, dropout_p, scale, enable_gqa, is_causal)
    if why is None:
        return _op(query, key, value, "HND", bool(is_causal), float(scale) if scale is not None else 0.0, pv,
                   False)[0]
    if not torch.compiler.is_compiling():
        count(*why)
    kwargs = {"enable_gqa": enable_gqa} if enable_gqa else {}
    return exact_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                      **kwargs)


def sdpa_taking(qkv: list, is_causal=False, scale=None, enable_gqa=False, *, pv="auto"):
    """`sage_sdpa` on [query, key, value] handed over in a list that holds their only references (ComfyUI core's
    attention containers), which it empties. Where the 8-bit kernel runs, each 16-bit tensor is released as soon as
    its 8-bit copy exists, on a config the kernel has already run in this process (`_api.forward_taking`); exact
    calls, gradients and torch.compile take `sage_sdpa`'s path, which holds them until it returns."""
    why = fallback_reason(*qkv, None, 0.0, scale, enable_gqa, is_causal)
    if why is not None or torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(t.requires_grad for t in qkv)):
        query, key, value = qkv
        qkv.clear()
        return sage_sdpa(query, key, value, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, pv=pv)
    return forward_taking(qkv, bool(is_causal), scale, pv)[0]
