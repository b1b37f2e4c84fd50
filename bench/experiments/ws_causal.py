"""Causal attention in the warp-specialized sm90 kernel (issue 14): checked against the Triton kernel and fp32 on
odd shapes, its accuracy on the accuracy table's inputs, and its speed, quantization included, beside the Triton
kernel, cuDNN and SageAttention 2 (where it imports) in one process; full attention at two shapes as a control.
On a GPU: `OUT=dir python -m comfy_sage.bench.experiments.ws_causal` (NOCHECK=1, NOACC=1, ROUNDS, NS=4096,8192).
`--plot result.json` draws the speed table (no GPU needed)."""
import contextlib
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from ...kernels import _attention_ws, sage_attention
from ..bench import KINDS, inputs, metrics, tops


@contextlib.contextmanager
def ws(on):
    """The warp-specialized kernel on ("1") or off ("0", the Triton kernel) for the calls inside."""
    old = os.environ.get(_attention_ws.ENV)
    os.environ[_attention_ws.ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[_attention_ws.ENV]
        else:
            os.environ[_attention_ws.ENV] = old


def call(q, k, v, pv, on, causal=True, lse=False):
    with ws(on):
        return sage_attention(q, k, v, pv=pv, is_causal=causal, return_lse=lse)


def check():
    """Against the Triton kernel and fp32: tails, Nq != Nk both ways, GQA, NHD views, several CTAs, the LSE."""
    rows = []
    for B, Hq, Hkv, Nq, Nk, D, nhd in [(1, 4, 4, 4096, 4096, 128, False), (2, 3, 3, 1000, 1000, 128, True),
                                       (1, 4, 2, 4096, 4096, 64, False), (1, 2, 2, 130, 130, 128, False),
                                       (2, 6, 2, 777, 777, 64, True), (1, 2, 2, 1000, 300, 128, False),
                                       (1, 2, 2, 300, 1000, 64, False), (1, 2, 2, 4500, 4500, 128, False),
                                       (1, 2, 2, 64, 64, 64, False), (1, 2, 2, 200, 4096, 128, False)]:
        g = torch.Generator(device="cuda").manual_seed(Nq + D)
        shp = lambda n, h: (B, n, h, D) if nhd else (B, h, n, D)  # noqa: E731
        q = torch.randn(shp(Nq, Hq), device="cuda", generator=g).to(torch.bfloat16)
        k, v = (torch.randn(shp(Nk, Hkv), device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
        if nhd:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        kk, vv = (t.float().repeat_interleave(Hq // Hkv, 1) for t in (k, v))
        s = (q.float() @ kk.transpose(-1, -2)) * D ** -0.5
        s = s.masked_fill(torch.ones(Nq, Nk, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
        ref, lref = torch.softmax(s, -1) @ vv, torch.logsumexp(s, -1)
        for pv in ("fp8", "fp16"):
            try:
                (o_w, l_w), (o_t, l_t) = call(q, k, v, pv, True, lse=True), call(q, k, v, pv, False, lse=True)
                torch.cuda.synchronize()
                r = dict(shape=[B, Hq, Hkv, Nq, Nk, D, nhd], pv=pv, nan=int(torch.isnan(o_w).sum()),
                         l1_ws=metrics(o_w, ref)[1], l1_triton=metrics(o_t, ref)[1],
                         lse_ws=(l_w - lref).abs().max().item(), lse_triton=(l_t - lref).abs().max().item())
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                r = dict(shape=[B, Hq, Hkv, Nq, Nk, D, nhd], pv=pv, error=f"{type(e).__name__}: {str(e)[:300]}")
            print(r, flush=True)
            rows.append(r)
    return rows


def accuracy():
    """Relative L1 vs fp32, causal (N=4096, H=8): FP8 and FP16 P·V in the warp-specialized kernel."""
    rows = []
    for D in (64, 128):
        for kind, dtype in KINDS.items():
            s = dict(B=1, H=8, N=4096, D=D, causal=True)
            q, k, v = inputs(s, kind, dtype=dtype)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
            r = dict(D=D, kind=kind, **{pv: metrics(call(q, k, v, pv, True), ref)[1] for pv in ("fp8", "fp16")})
            print(r, flush=True)
            rows.append(r)
    return rows


def speed(s, rounds):
    q, k, v = inputs(s, "randn", dtype=torch.bfloat16)
    c = s["causal"]
    fns = {"cudnn": lambda: _cudnn(q, k, v, c)}
    for pv in ("fp8", "fp16"):
        fns[f"{pv}_ws"] = (lambda pv: lambda: call(q, k, v, pv, True, c))(pv)
        fns[f"{pv}_triton"] = (lambda pv: lambda: call(q, k, v, pv, False, c))(pv)
    try:
        from sageattention import sageattn

        fns["sageattention2"] = lambda: sageattn(q, k, v, is_causal=c, tensor_layout="HND")
    except ImportError:
        pass
    row = dict(s)
    order = list(fns)
    for rnd in range(rounds):
        for name in (order if rnd % 2 == 0 else order[::-1]):
            try:
                row.setdefault(name, []).append(round(tops(s, do_bench(fns[name], warmup=25, rep=200,
                                                                       return_mode="median")), 1))
            except Exception as e:  # noqa: BLE001
                row[name] = f"{type(e).__name__}: {str(e)[:200]}"
    print(row, flush=True)
    return row


def _cudnn(q, k, v, causal):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def main():
    if sys.argv[1:2] == ["--plot"]:
        from .exp_sm90 import plot as bars

        return bars(json.load(open(sys.argv[2])), sys.argv[2].rsplit(".", 1)[0] + ".png")
    res = {"gpu": torch.cuda.get_device_name()}
    if not os.environ.get("NOCHECK"):
        res["check"] = check()
    if not os.environ.get("NOACC"):
        res["accuracy"] = accuracy()
    rounds = int(os.environ.get("ROUNDS", 2))
    ns = [int(n) for n in os.environ.get("NS", "4096,8192,16384,32768").split(",")]
    shapes = [dict(B=max(1, 16384 // n), H=24 if d == 128 else 32, N=n, D=d, causal=True) for d in (128, 64)
              for n in ns]
    shapes += [dict(B=1, H=24, N=n, D=128, causal=False) for n in (16384, 32768)]
    res["speed"] = [speed(s, rounds) for s in shapes]
    out = os.environ.get("OUT", "/tmp")
    json.dump(res, open(os.path.join(out, "ws_causal.json"), "w"), indent=1)
    print("wrote", os.path.join(out, "ws_causal.json"))


if __name__ == "__main__":
    main()
