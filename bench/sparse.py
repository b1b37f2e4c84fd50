"""Sparse attention at Wan 720p's self-attention shape: time and error, ours against the dense paths and the peers.

    python -m comfy_sage.bench.sparse [bench/results/sparse-<gpu>.json] [--cpu-smoke]

One process, one GPU: q, k, v of 21 × 45 × 80 = 75,600 tokens, 40 heads of 128 (bf16), with space-time locality
(`bench.local_inputs`: "local" at strength 4, "diffuse" at 3, where far tokens hold most of the mass) and random
(`bench.inputs`). Methods: cuDNN's SDPA, our dense 8-bit path (`auto`), our
`sparse_attention` at each `keep` level and at fixed densities (`ratio`), and comfy-kitchen's `sol_attn` (ComfyUI
core's Model Sparse Attention) at each `tau` where it imports. Time: median of Triton's do_bench (quantization and
block selection included; the selection alone too, Triton against its torch model). Error: relative L1 against fp32 attention on 256 evenly spaced query rows per head.
Writes the JSON and, with matplotlib, a PNG (time against error, per input) beside it. `--cpu-smoke` runs a tiny shape through
Triton's interpreter (timings meaningless): it checks the script.
"""
import argparse
import contextlib
import datetime
import functools
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..kernels import _arch, _sparse, sage_attention, sparse_attention
from ..kernels.calibrate import _reference, _rel_l1, sample_rows
from .bench import inputs, local_inputs

SHAPE = dict(frames=21, height=45, width=80, heads=40, D=128)  # Wan 2.1 14B at 720p, 81 frames
SMOKE = dict(frames=2, height=4, width=8, heads=2, D=64)
KEEPS = (0.99, 0.9, 0.8, 0.6, 0.4, 0.3, 0.25, 0.2)  # calibration's levels (kernels/calibrate.py), sparse P·V path
RATIOS = (0.5, 0.25, 0.15, 0.1)
PVS = ("fp8", "int8", "fp16")
TAUS = (0.5, 1.0, 1.5, 2.0, 3.0)


def methods(cuda, keeps=KEEPS, ratios=RATIOS):
    m = {"sdpa_cudnn" if cuda else "sdpa": lambda q, k, v: _cudnn(q, k, v, cuda), "sage_dense": sage_attention}
    m.update({f"sparse_keep{keep}": functools.partial(sparse_attention, keep=keep) for keep in keeps})
    m.update({f"sparse_ratio{r}": functools.partial(sparse_attention, ratio=r) for r in ratios})
    for pv in PVS:  # each P·V path, dense and at the middle density
        m[f"sage_dense_{pv}"] = functools.partial(sage_attention, pv=pv)
        m.update({f"sparse_ratio{r}_{pv}": functools.partial(sparse_attention, ratio=r, pv=pv) for r in ratios[1:2] or ratios})
    try:  # comfy-kitchen's sparse attention: (B, T, H, 128) in, 64-token blocks, routed by tau
        from comfy_kitchen import sol_attn, sol_attn_is_available

        if cuda and sol_attn_is_available(torch.device("cuda")):
            m.update({f"sol_attn_tau{t}": (lambda t: lambda q, k, v: sol_attn(
                *(x.transpose(1, 2) for x in (q, k, v)), tau=t).transpose(1, 2))(t) for t in TAUS})
    except ImportError:
        pass
    return m


def _cudnn(q, k, v, cuda):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]) if cuda else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v)


def _ms(fn, cuda):
    if cuda:
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=50, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def selection_ms(q, k, cuda, levels=(("keep", 0.25), ("ratio", 0.25))):
    """The block selection alone, as a sparse call makes it (the arch's sparse tile): the Triton pass against its
    torch model (argsort and cumulative sums), ms each."""
    entry = _arch.arch_of(q.device)
    tile = entry.tiles[(_arch.head_dim_bucket(q.shape[-1]), entry.sparse_pv)]
    out = {}
    for mode, share in levels:
        sp = _sparse.Sparsity(**{mode: share})
        kw = dict(block_m=tile.block_m, block_n=tile.block_n, causal=False, scale=q.shape[-1] ** -0.5, sparsity=sp)
        for name, fn in (("triton", _sparse.select), ("torch", _sparse._select_torch)):
            out[f"{mode}{share}_{name}_ms"] = _ms(lambda: fn(q, k, **kw), cuda)
    return out


def run(shape, cuda, log=print, **levels):
    dev = "cuda" if cuda else "cpu"
    s = dict(B=1, H=shape["heads"], N=shape["frames"] * shape["height"] * shape["width"], D=shape["D"])
    local = functools.partial(local_inputs, shape["frames"], shape["height"], shape["width"], shape["heads"],
                              shape["D"], dtype=torch.bfloat16, device=dev)
    cases = {"local": local(), "diffuse": local(strength=3.0),
             "random": inputs(s, "randn", dtype=torch.bfloat16, seed=1, device=dev)}
    rows = {}
    for name, (q, k, v) in cases.items():
        idx = sample_rows(s["N"], 256).to(dev)
        ref = _reference(q.index_select(2, idx), k, v, idx, s["D"] ** -0.5, False)
        rows[name] = {}
        for method, fn in methods(cuda, **levels).items():
            try:
                with torch.no_grad():
                    out = fn(q, k, v)
                    r = {"rel_l1": _rel_l1(out.index_select(2, idx), ref), "ms": _ms(lambda: fn(q, k, v), cuda)}
                if getattr(fn, "func", None) is sparse_attention:
                    _, r["density"] = fn(q, k, v, return_density=True)
            except Exception as e:  # a method that cannot run this shape is reported, not fatal
                r = {"error": f"{type(e).__name__}: {e}"[:300]}
            rows[name][method] = r
            log(f"{name:6s} {method:18s} {r}")
        rows[name]["selection"] = r = selection_ms(q, k, cuda)
        log(f"{name:6s} {'selection':18s} {r}")
        del q, k, v
    return dict(shape=s, frames=shape["frames"], height=shape["height"], width=shape["width"], results=rows)


def plot(result, path):
    """Per input, time against error; and our density -> time curve against cuDNN and our dense path (matplotlib);
    False where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res_all = result["results"]
    fig, axes = plt.subplots(1, len(res_all) + 1, figsize=(6 * (len(res_all) + 1), 4.5))
    for ax, (name, res) in zip(axes, res_all.items()):
        for family, marker in (("sdpa", "s"), ("sage_dense", "D"), ("sparse_keep", "o"), ("sparse_ratio", "^"),
                               ("sol_attn", "x")):
            pts = [(r["ms"], r["rel_l1"]) for m, r in res.items() if m.startswith(family) and "ms" in r]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=family)
        ax.set_xlabel("ms per call")
        ax.set_ylabel("relative L1 vs fp32")
        ax.set_yscale("log")
        ax.set_title(f"{name} q/k")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    ax = axes[-1]  # density -> time: what skipping blocks buys, whatever the input
    for name, res in res_all.items():
        pts = sorted((r["density"], r["ms"]) for m, r in res.items()
                     if m.startswith(("sparse_keep", "sparse_ratio")) and "ms" in r and m.count("_") == 1)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"ours, {name} q/k")
    first = next(iter(res_all.values()))
    for m, style in (("sdpa_cudnn", "--"), ("sdpa", "--"), ("sage_dense", ":")):
        if "ms" in first.get(m, {}):
            ax.axhline(first[m]["ms"], linestyle=style, color="gray", label=m)
    ax.set_xlabel("density (share of key blocks computed)")
    ax.set_ylabel("ms per call")
    ax.set_title("density -> time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"{result['gpu']}: {result['shape']['N']:,} tokens, {result['shape']['H']} heads of "
                 f"{result['shape']['D']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m comfy_sage.bench.sparse", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", help="JSON path (default bench/results/sparse-<gpu>-<date>.json)")
    ap.add_argument("--cpu-smoke", action="store_true", help="a tiny shape through Triton's interpreter")
    args = ap.parse_args(argv)
    cuda = not args.cpu_smoke
    if cuda and not torch.cuda.is_available():
        print("error: bench/sparse.py needs a CUDA GPU (or --cpu-smoke)")
        return 2
    if not cuda and _arch.arch_of(torch.device("cpu")) is None:
        print("error: --cpu-smoke runs the kernels through Triton's interpreter: set TRITON_INTERPRET=1")
        return 2
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    result = dict(gpu=gpu, torch=torch.__version__, date=datetime.date.today().isoformat(),
                  **(run(SMOKE, cuda, keeps=(0.9,), ratios=(0.25,)) if args.cpu_smoke else run(SHAPE, cuda)))
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"sparse-{gpu.lower().replace(' ', '-')}-{result['date']}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    png = os.path.splitext(out)[0] + ".png"
    print(f"wrote {out}" + (f" and {png}" if plot(result, png) else " (no matplotlib: no PNG)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
