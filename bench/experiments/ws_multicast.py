"""K and V multicast to clusters of two CTAs in the warp-specialized kernel (`_attention_ws.attention(ctas=2)`,
Triton 3.9, full attention): one bulk copy of each key block for both CTAs of a head's cluster, half the L2 ->
shared-memory traffic (the energy lever of bench/NOTES.md), against one CTA (ctas=1), whatever the table says;
A/B in one process through `sage_attention` (quantization included), `pv="auto"` (16-bit P·V on sm90) and `"fp8"`,
rounds interleaved, the SM clock and board power read during each timing; the peers that import (SageAttention 2,
comfy-kitchen: bench.methods) timed in the same rounds. Run once per Triton in one device call:
`OUT=dir python -m comfy_sage.bench.experiments.ws_multicast`; `... ws_multicast plot OUT.png LABEL=a.json ...` draws
the runs side by side (no GPU needed)."""
import json
import os
import sys

import torch
import triton
from triton.testing import do_bench

from ...kernels import _attention_ws, sage_attention
from ..bench import environment, methods, tops
from ..clocks import Clocks

SHAPES = [(128, 24, 16384, False), (128, 24, 32768, False), (64, 32, 32768, False),
          (128, 40, 75600, False)]  # the last: Wan 2.1 14B at 720p
VARIANTS = (1, 2)  # CTAs a cluster


PEERS = ("sageattention_pypi", "comfy_kitchen_int8")  # bench.methods' names


def timed(fn):
    """Median milliseconds, and the clocks during the timing."""
    with Clocks(torch.cuda.current_device()) as clk:
        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
    return ms, clk.summary()


def forced(plain, ctas):
    """_attention_ws.attention with the cluster size set here, whatever the caller passes."""
    return lambda *a, **kw: plain(*a, **{**kw, "ctas": ctas})


def check(plain):
    """Each variant's output against one CTA on odd shapes (a tail block, GQA, 64-token heads, a cluster past the
    last row, LSE): equal bits."""
    rows = []
    for B, Hq, Hkv, N, D in [(1, 4, 4, 1000, 128), (2, 6, 2, 4097, 64), (1, 2, 2, 64, 128), (1, 3, 3, 9000, 128)]:
        g = torch.Generator(device="cuda").manual_seed(1)
        q = torch.randn((B, Hq, N, D), device="cuda", generator=g, dtype=torch.float16)
        k, v = (torch.randn((B, Hkv, N, D), device="cuda", generator=g, dtype=torch.float16) for _ in range(2))
        for pv in ("auto", "fp8"):
            outs = {}
            for pp in VARIANTS:
                _attention_ws.attention = forced(plain, pp)
                try:
                    o, lse = sage_attention(q, k, v, return_lse=True, pv=pv)
                    outs[pp] = torch.cat([o.float().flatten(), lse.float().flatten()])
                finally:
                    _attention_ws.attention = plain
            r = dict(shape=[B, Hq, Hkv, N, D], pv=pv,
                     max_diff={pp: (o - outs[1]).abs().max().item() for pp, o in outs.items()})
            print(r, flush=True)
            rows.append(r)
    return rows


def main(out, rounds=2):
    plain = _attention_ws.attention
    peers = {name: fn for name, fn in methods().items() if name in PEERS}
    checks = check(plain)
    rows = []
    for D, H, N, causal in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn((1, H, N, D), device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
        shape = dict(B=1, H=H, N=N, D=D, causal=causal)
        for pv in ("auto", "fp8"):
            ref = None
            for rnd in range(rounds):
                for pp in (VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]):
                    _attention_ws.attention = forced(plain, pp)
                    try:
                        o = sage_attention(q, k, v, pv=pv, is_causal=causal)
                        if ref is None:
                            ref = o
                        diff = (o.float() - ref.float()).abs().max().item()
                        ms, clk = timed(lambda: sage_attention(q, k, v, pv=pv, is_causal=causal))
                    finally:
                        _attention_ws.attention = plain
                    r = dict(shape, pv=pv, ctas=pp, round=rnd, ms=round(ms, 4), tops=round(tops(shape, ms), 1),
                             max_diff_to_first=diff, clocks=clk)
                    print(r, flush=True)
                    rows.append(r)
                if pv == "auto":  # the peers, in the same rounds
                    for name, fn in peers.items():
                        try:
                            ms, clk = timed(lambda: fn(q, k, v, causal))
                            r = dict(shape, method=name, round=rnd, ms=round(ms, 4), tops=round(tops(shape, ms), 1),
                                     clocks=clk)
                        except Exception as e:  # noqa: BLE001 - a peer that cannot run a shape is reported
                            r = dict(shape, method=name, round=rnd, error=f"{type(e).__name__}: {e}"[:300])
                        print(r, flush=True)
                        rows.append(r)
    res = dict(env=environment(), check=checks, rows=rows)
    path = os.path.join(out, f"ws-multicast-triton-{triton.__version__}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", path)


def plot(png, runs):
    """TOPS of each shape and path by variant, one panel per run (LABEL=json)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 4.5), squeeze=False)
    for ax, (label, path) in zip(axes[0], runs):
        res = json.load(open(path))
        env = res.get("env") or {"gpu": res["device"], "triton": res["triton"]}  # session 17's file had no env
        keys = sorted({(r["D"], r["N"], r["H"], r["causal"], r["pv"]) for r in res["rows"] if "ctas" in r})
        for i, pp in enumerate(VARIANTS):
            vals = []
            for key in keys:
                t = [r["tops"] for r in res["rows"] if "ctas" in r
                     and (r["D"], r["N"], r["H"], r["causal"], r["pv"]) == key and r["ctas"] == pp]
                vals.append(sum(t) / len(t))
            ax.bar([x + 0.4 * i for x in range(len(keys))], vals, 0.4,
                   label=f"{pp} CTA{'s' if pp > 1 else ''} a cluster")
        for name in PEERS:  # a marker over each shape's bars
            pts = [(x + 0.2, r["tops"]) for x, key in enumerate(keys) for r in res["rows"]
                   if r.get("method") == name and "tops" in r and (r["D"], r["N"], r["H"], r["causal"]) == key[:4]]
            if pts:
                ax.scatter(*zip(*pts), marker="x", zorder=3, label=name)
        ax.set_xticks([x + 0.2 for x in range(len(keys))])
        ax.set_xticklabels([f"hd{d} {n // 1024}k{' c' if c else ''}\n{pv}" for d, n, h, c, pv in keys], fontsize=7)
        ax.set_ylabel("TOPS (quantization included)")
        ax.set_title(f"{label}: {env['gpu']}, Triton {env['triton']}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    if sys.argv[1:2] == ["plot"]:
        plot(sys.argv[2], [a.split("=", 1) for a in sys.argv[3:]])
    else:
        main(os.environ.get("OUT", "/tmp"), int(os.environ.get("ROUNDS", 2)))
