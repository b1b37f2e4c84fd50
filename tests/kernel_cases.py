"""Inputs and metrics shared by the CPU (interpreter) and GPU kernel tests."""
import torch
import torch.nn.functional as F


# Kernel v10's accuracy targets (issue 14, relative L1 against fp32) for pv="int8" on the four input kinds
INT8_TARGETS = {"randn": 0.016, "kbias": 0.022, "qoutlier": 0.03, "onehot": 0.035}


def make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype=torch.float16, device="cpu", kind="randn", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g, device=device)
    k = torch.randn(B, Hkv, Nk, D, generator=g, device=device)
    v = torch.randn(B, Hkv, Nk, D, generator=g, device=device)
    if kind == "kbias":  # the outlier pattern of diffusion layers: a channel offset shared by all keys
        k = k + 8 * torch.randn(1, Hkv, 1, D, generator=g, device=device)
        q = q * 2
    elif kind == "qoutlier":  # bench/bench.py's hard inputs: one q channel offset by 60 in every token ...
        q[..., 0] += 60
    elif kind == "onehot":  # ... and near one-hot rows (logits of std 36)
        q, k = q * 6, k * 6
    return q.to(dtype), k.to(dtype), v.to(dtype)


def exact(q, k, v, is_causal=False, scale=None):
    """fp32 attention (HND) with GQA, and its natural-log LSE."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q.float() @ kk.transpose(-1, -2) * scale
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ vv, torch.logsumexp(s, -1)


def rel_l1(out, ref):
    return ((out.float() - ref.float()).abs().sum() / ref.float().abs().sum()).item()


def cosine(out, ref):
    return F.cosine_similarity(out.float().flatten(), ref.float().flatten(), dim=0).item()
