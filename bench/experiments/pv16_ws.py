"""16-bit P·V in the warp-specialized sm90 kernel (issue 14): its speed, quantization included, beside cuDNN, the
package's FP8 and FP16 paths, and its accuracy on the four inputs of the accuracy table, with and without the
block-Hadamard rotation of q and k. On a GPU: `OUT=dir python -m comfy_sage.bench.experiments.pv16_ws`.
VARIANTS (JSON: name -> consumers, stages, maxnreg), NOCHECK=1, NOACC=1, ROUNDS. (Results a-c ran before
pv="fp16" rotated q and k and took this kernel itself; the overlap and lazy variants of b and c ran the kernel of
commit 92c0a6a. `fp16_triton` now forces the Triton kernel with COMFY_SAGE_WS=0.)
`python -m comfy_sage.bench.experiments.pv16_ws --plot result.json` draws a result's speed table (no GPU needed)."""
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from ...kernels import _attention_ws, _quant, sage_attention
from ..bench import KINDS, environment, inputs, metrics, tops
from .ws_causal import ws

DEFAULT = {"c3s2": dict(consumers=3, stages=2, maxnreg=128), "c3s3": dict(consumers=3, stages=3, maxnreg=128),
           "c2s2": dict(consumers=2, stages=2, maxnreg=168)}


def ws16(q, k, v, *, consumers, stages, maxnreg, rot=1, lse=False):
    """q, k, v [B, H, N, D] (HND views): quantization and the warp-specialized kernel with 16-bit P·V."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dims = (B, Hq, Hkv, Nq, Nk, D, D)
    out = torch.empty((B, Hq, Nq, D), dtype=q.dtype, device=q.device)
    ls = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device) if lse else None
    qz = _quant.quantize(q, k, v, dims=dims, scale=D ** -0.5, block_m=64, block_n=128, fp8_v=False, lse=ls, rot=rot)
    _attention_ws.attention(qz, out, ls, dims=dims, block_m=64, block_n=128, consumers=consumers, stages=stages,
                            maxnreg=maxnreg, v=v)
    return (out, ls) if lse else out


def fp16_triton(q, k, v):
    """The package's FP16 P·V through the Triton kernel (the warp-specialized one switched off for this call)."""
    with ws(False):
        return sage_attention(q, k, v, pv="fp16")


def check(variants):
    """Against the package's Triton FP16 kernel and fp32: odd lengths, several CTAs, GQA, NHD views, the LSE."""
    rows = []
    for B, Hq, Hkv, N, D, nhd in [(1, 4, 4, 4096, 128, False), (2, 3, 3, 1000, 128, True), (1, 4, 2, 4096, 64, False),
                                  (1, 2, 2, 130, 128, False), (2, 6, 2, 777, 64, True)]:
        g = torch.Generator(device="cuda").manual_seed(0)
        shp = (B, N, Hq, D) if nhd else (B, Hq, N, D)
        q = torch.randn(shp, device="cuda", generator=g, dtype=torch.float32).to(torch.bfloat16)
        kshp = (B, N, Hkv, D) if nhd else (B, Hkv, N, D)
        k, v = (torch.randn(kshp, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
        if nhd:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=Hq != Hkv)
        lref = torch.logsumexp((q.float() @ k.float().repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) * D ** -0.5,
                               -1)
        o_t = fp16_triton(q, k, v)
        for name, kw in variants.items():
            try:
                o, ls = ws16(q, k, v, lse=True, **kw)
                torch.cuda.synchronize()
                r = dict(shape=[B, Hq, Hkv, N, D, nhd], variant=name, nan=int(torch.isnan(o).sum()),
                         l1_ws=metrics(o, ref)[1], l1_triton=metrics(o_t, ref)[1],
                         lse_maxdiff=(ls - lref).abs().max().item())
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                r = dict(shape=[B, Hq, Hkv, N, D, nhd], variant=name, error=f"{type(e).__name__}: {str(e)[:300]}")
            print(r, flush=True)
            rows.append(r)
    return rows


def accuracy(kw):
    """Relative L1 vs fp32 (N=4096, H=8, full) of FP8, FP16 (Triton) and the 16-bit warp-specialized kernel,
    unrotated and rotated, on the accuracy table's inputs."""
    rows = []
    for D in (64, 128):
        for kind, dtype in KINDS.items():
            s = dict(B=1, H=8, N=4096, D=D, causal=False)
            q, k, v = inputs(s, kind, dtype=dtype)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            r = dict(D=D, kind=kind)
            r["fp8"] = metrics(sage_attention(q, k, v, pv="fp8"), ref)[1]
            r["fp16_triton"] = metrics(fp16_triton(q, k, v), ref)[1]
            r["fine"] = metrics(sage_attention(q, k, v, pv="fine"), ref)[1]
            r["int8"] = metrics(sage_attention(q, k, v, pv="int8"), ref)[1]
            r["ws16"] = metrics(ws16(q, k, v, **kw), ref)[1]
            r["ws16_H"] = metrics(ws16(q, k, v, rot=_quant.rotation_width(D), **kw), ref)[1]
            print(r, flush=True)
            rows.append(r)
    return rows


def speed(s, variants, rounds):
    q, k, v = inputs(s, "randn", dtype=torch.bfloat16)
    fns = {"cudnn": lambda: _cudnn(q, k, v), "fp8": lambda: sage_attention(q, k, v, pv="fp8"),
           "fp16_triton": lambda: fp16_triton(q, k, v)}
    D = s["D"]
    for name, kw in variants.items():
        fns["ws16_" + name] = (lambda kw: lambda: ws16(q, k, v, **kw))(kw)
    first = next(iter(variants.values()))
    fns["ws16_H_" + next(iter(variants))] = lambda: ws16(q, k, v, rot=_quant.rotation_width(D), **first)
    dims = (s["B"], s["H"], s["H"], s["N"], s["N"], D, D)
    for rot in (1, _quant.rotation_width(D)):
        fns[f"quant_rot{rot}"] = (lambda rot: lambda: _quant.quantize(
            q, k, v, dims=dims, scale=D ** -0.5, block_m=64, block_n=128, fp8_v=False, rot=rot))(rot)
    row = dict(s)
    order = list(fns)
    for rnd in range(rounds):
        for name in (order if rnd % 2 == 0 else order[::-1]):
            try:
                ms = do_bench(fns[name], warmup=25, rep=200, return_mode="median")
                row.setdefault(name, []).append(round(ms, 4) if name.startswith("quant") else round(tops(s, ms), 1))
            except Exception as e:  # noqa: BLE001
                row[name] = f"{type(e).__name__}: {str(e)[:200]}"
    print(row, flush=True)
    return row


def _cudnn(q, k, v):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v)


def plot(path):
    """The speed table of a result JSON as bars (exp_sm90's plot), next to it."""
    from .exp_sm90 import plot as bars

    bars(json.load(open(path)), path.rsplit(".", 1)[0] + ".png")


def main():
    if sys.argv[1:2] == ["--plot"]:
        return plot(sys.argv[2])
    variants = json.loads(os.environ["VARIANTS"]) if os.environ.get("VARIANTS") else DEFAULT
    res = {"gpu": torch.cuda.get_device_name(), "env": environment(), "variants": variants}
    if not os.environ.get("NOCHECK"):
        res["check"] = check(variants)
    if not os.environ.get("NOACC"):
        res["accuracy"] = accuracy(next(iter(variants.values())))
    res["speed"] = [speed(dict(B=1, H=h, N=n, D=d, causal=False), variants, int(os.environ.get("ROUNDS", 2)))
                    for h, n, d in [(24, 16384, 128), (24, 32768, 128), (32, 32768, 64), (40, 75600, 128)]]
    out = os.environ.get("OUT", "/tmp")
    json.dump(res, open(os.path.join(out, "pv16_ws.json"), "w"), indent=1)
    print("wrote", os.path.join(out, "pv16_ws.json"))


if __name__ == "__main__":
    main()
