"""The Gluon experiment (gluon_sm90.py) against the package's Triton kernel on the same quantized inputs, with
cuDNN and flash in the same process: `OUT=dir python -m comfy_sage.bench.experiments.exp_sm90` on a GPU.
VARIANTS (JSON: name -> gluon_sm90.attention keywords; "module": "ws" runs the package's warp-specialized kernel,
kernels/_attention_ws.py, with its keywords consumers/stages/maxnreg, checked on the full-attention shapes),
NSPEED (how many shapes), ROUNDS, NOCHECK=1."""
import json
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from ...kernels import _arch, _attention, _attention_ws, _quant
from ..bench import metrics, tops
from . import gluon_sm90


def _tile(D):
    """The sm90 table's FP8 tile: what the package runs, and the block sizes the quantization is cut for."""
    return _arch.ARCHES["sm90"].tiles[(D, "fp8")]


def setup(B, H, N, D, dtype=torch.float16, seed=0, nhd=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (B, N, H, D) if nhd else (B, H, N, D)
    q, k, v = (torch.randn(shape, device="cuda", generator=g).to(dtype) for _ in range(3))
    if nhd:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    dims = (B, H, H, N, N, D, D)
    t = _tile(D)
    qz = _quant.quantize(q, k, v, dims=dims, scale=D ** -0.5, block_m=t.block_m, block_n=t.block_n, fp8_v=True)
    return q, k, v, dims, qz


def run_triton(qz, v, out, lse, dims, causal):
    t = _tile(dims[5])
    _attention.attention(qz, v, out, lse, dims=dims, block_m=t.block_m, block_n=t.block_n, causal=causal,
                         fp8_v=True, num_warps=t.num_warps, num_stages=t.num_stages, tma=t.tma, maxnreg=t.maxnreg)


def run_gluon(qz, out, lse, dims, causal, module=None, **kw):
    t = _tile(dims[5])
    if module == "ws":
        if causal:
            raise ValueError("the warp-specialized kernel runs full attention only")
        _attention_ws.attention(qz, out, lse, dims=dims, block_m=t.block_m, block_n=t.block_n, **kw)
    else:
        gluon_sm90.attention(qz, out, lse, dims=dims, block_m=t.block_m, block_n=t.block_n, causal=causal, **kw)


def check(B, H, N, D, causal, **kw):
    q, k, v, dims, qz = setup(B, H, N, D)
    o1 = torch.full_like(q, float("nan"))
    o2 = torch.full_like(q, float("nan"))
    # zeros: the package's kernels add their LSE to what the buffer holds (the quantization pass's scale·q·m;
    # none here); gluon_sm90's overwrites it
    l1 = torch.zeros((B, H, N), device="cuda")
    l2 = torch.zeros((B, H, N), device="cuda")
    run_triton(qz, v, o1, l1, dims, causal)
    run_gluon(qz, o2, l2, dims, causal, **kw)
    torch.cuda.synchronize()
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    r = dict(B=B, H=H, N=N, D=D, causal=causal, kw=kw, nan_gluon=int(torch.isnan(o2).sum()),
             maxdiff=(o1.float() - o2.float()).abs().max().item(), l1_triton=metrics(o1, ref)[1],
             l1_gluon=metrics(o2, ref)[1], lse_maxdiff=(l1 - l2).abs().max().item())
    print(r, flush=True)
    return r


def speed(B, H, N, D, causal, variants, nhd=False):
    q, k, v, dims, qz = setup(B, H, N, D, dtype=torch.bfloat16, nhd=nhd)
    out = torch.empty_like(q)
    row = dict(B=B, H=H, N=N, D=D, causal=causal, nhd=nhd)
    fns = {"triton": lambda: run_triton(qz, v, out, None, dims, causal)}
    for name, kw in variants.items():
        fns["gluon_" + name] = (lambda kw: lambda: run_gluon(qz, out, None, dims, causal, **kw))(kw)
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        def f(be=be):
            with sdpa_kernel([be]):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        fns[name] = f
    t = _tile(D)
    fns["quant"] = lambda: _quant.quantize(q, k, v, dims=dims, scale=D ** -0.5, block_m=t.block_m,
                                           block_n=t.block_n, fp8_v=True)
    order = list(fns)
    for rnd in range(int(os.environ.get("ROUNDS", 2))):
        for name in (order if rnd % 2 == 0 else order[::-1]):
            try:
                ms = do_bench(fns[name], warmup=25, rep=200 if N < 50000 else 600, return_mode="median")
                row.setdefault(name, []).append(round(ms, 4) if name == "quant" else round(tops(row, ms), 1))
            except Exception as e:
                row[name] = f"{type(e).__name__}: {str(e)[:200]}"
    print(row, flush=True)
    return row


def plot(result, path):
    """Median TOPS of each method per shape, as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["speed"]
    names = [k for k in rows[0] if isinstance(rows[0][k], list) and not k.startswith("quant")]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        med = [sorted(r[name])[len(r[name]) // 2] if isinstance(r.get(name), list) else 0 for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], med, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))])
    ax.set_xticklabels([f"hd{r['D']} N={r['N']}\nH={r['H']}{' causal' if r['causal'] else ''}" for r in rows],
                       fontsize=8)
    ax.set_ylabel("TOPS (median of rounds)")
    ax.legend(fontsize=8)
    ax.set_title(f"{result['gpu']}: attention kernels in one process")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    res = {"gpu": torch.cuda.get_device_name(), "check": [], "speed": []}
    if not os.environ.get("NOCHECK"):
        for args in [(1, 4, 4096, 128, False), (1, 4, 4096, 128, True), (2, 3, 1000, 128, False),
                     (2, 3, 1000, 128, True), (1, 4, 4096, 64, False), (1, 3, 777, 64, True), (1, 2, 130, 128, False)]:
            for ahead in (True, False):
                res["check"].append(check(*args, ahead=ahead))
    variants = json.loads(os.environ.get(
        "VARIANTS", '{"ahead": {}, "serial": {"ahead": false, "k_stages": 2, "maxnreg": 168}}'))
    if not os.environ.get("NOCHECK"):
        for kw in (kw for kw in variants.values() if kw.get("module") == "ws"):
            for args in [(1, 4, 4096, 128, False), (2, 3, 1000, 128, False), (1, 4, 4096, 64, False),
                         (1, 2, 130, 128, False)]:
                res["check"].append(check(*args, **kw))
    for args in [(1, 24, 16384, 128, False), (1, 40, 75600, 128, False, True), (1, 40, 32760, 128, False, True),
                 (1, 24, 32768, 128, True), (1, 32, 32768, 64, False)][: int(os.environ.get("NSPEED", 5))]:
        res["speed"].append(speed(*args[:5], variants, nhd=len(args) > 5))
    out = os.environ.get("OUT", "/tmp")
    json.dump(res, open(os.path.join(out, "exp_sm90.json"), "w"), indent=1)
    plot(res, os.path.join(out, "exp_sm90.png"))


if __name__ == "__main__":
    main()
