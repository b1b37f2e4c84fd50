"""Extra device memory of one attention call: the peak bytes allocated while it runs, beyond its inputs and what
it returns (output, LSE), as a multiple of the bytes of q+k+v. Ours on every P·V path, with and without the LSE, in
each layout (HND contiguous, NHD contiguous, NHD views of one fused [B, N, 3·H·D] projection as ComfyUI and
diffusers hand them) and head dim; SDPA's default, SageAttention 2 and comfy-kitchen in the same process where they
import (`../shared/peers/`). Our contract: at most 0.6x (kernels/_quant.py).

    python -m comfy_sage.bench.memory [--out bench/results]     (CUDA GPU)
"""
import argparse
import datetime
import json
import os
import re

import torch
import torch.nn.functional as F

from ..kernels import sage_attention

HEAD_DIMS = (16, 40, 64, 72, 96, 128, 256)
LENGTHS = (1024, 4096, 16384)
LAYOUTS = ("HND", "NHD", "NHD-view")
OURS = {"fp16": {}, "fp8": {}, "fine": {}, "fp16+lse": {"return_lse": True}, "fp8+lse": {"return_lse": True}}
CONTRACT = 0.6


def make(layout, B, H, N, D, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if layout == "NHD-view":
        qkv = torch.randn(B, N, 3 * H * D, device="cuda", generator=g, dtype=torch.float16)
        return tuple(t.view(B, N, H, D) for t in qkv.split(H * D, dim=-1))
    shape = (B, H, N, D) if layout == "HND" else (B, N, H, D)
    return tuple(torch.randn(shape, device="cuda", generator=g, dtype=torch.float16) for _ in range(3))


def extra(fn, q, k, v):
    """(peak bytes beyond the inputs and the results) / bytes of q+k+v, after one warm-up call (compilation).
    Bytes as requested: the caching allocator's block counts can include an unsplit remainder of up to 1 MB per
    allocation, which is its bookkeeping, not memory the call asked for."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_stats()["requested_bytes.all.current"]
    res = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.memory_stats()["requested_bytes.all.peak"] - base
    kept = sum(t.untyped_storage().nbytes() for t in (res if isinstance(res, tuple) else (res,)))
    qkv = sum(t.numel() * t.element_size() for t in (q, k, v))
    return round((peak - kept) / qkv, 4)


def peers():
    """name -> fn(q, k, v, layout) for the peers that import; each returns the output."""
    out = {"sdpa_default": lambda q, k, v, layout: F.scaled_dot_product_attention(
        *(t if layout == "HND" else t.transpose(1, 2) for t in (q, k, v)))}
    try:
        from sageattention import sageattn

        out["sageattention2"] = lambda q, k, v, layout: sageattn(q, k, v, tensor_layout=layout[:3])
    except ImportError:
        pass
    try:
        from comfy_kitchen import int8_attention

        # HND only: NHD inputs are handed over as transposed views, as ComfyUI's attention functions do
        out["comfy_kitchen_int8"] = lambda q, k, v, layout: int8_attention(
            *(t if layout == "HND" else t.transpose(1, 2) for t in (q, k, v)))
    except ImportError:
        pass
    return out


def run(B=1, H=16):
    rows = []
    others = peers()
    for D in HEAD_DIMS:
        for N in LENGTHS:
            for layout in LAYOUTS:
                q, k, v = make(layout, B, H, N, D, seed=D + N)
                row = dict(D=D, N=N, layout=layout)
                for name, kw in OURS.items():
                    pv = name.split("+")[0]
                    row[f"ours_{name}"] = extra(lambda: sage_attention(q, k, v, layout=layout[:3], pv=pv, **kw),
                                                q, k, v)
                for name, fn in others.items():
                    try:
                        row[name] = extra(lambda: fn(q, k, v, layout), q, k, v)
                    except Exception as e:  # a peer that rejects this head dim or layout is reported, not fatal
                        row[name] = f"{type(e).__name__}: {str(e)[:120]}"
                rows.append(row)
                print(row, flush=True)
                del q, k, v
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in rows[0] if k not in ("D", "N", "layout")]
    fig, axes = plt.subplots(1, len(LAYOUTS), figsize=(15, 4.5), sharey=True)
    for ax, layout in zip(axes, LAYOUTS):
        sel = [r for r in rows if r["layout"] == layout and r["N"] == LENGTHS[-1]]
        for name in names:
            ax.plot([r["D"] for r in sel], [r[name] if isinstance(r[name], float) else float("nan") for r in sel],
                    marker="o", label=name)
        ax.axhline(CONTRACT, color="k", ls="--", lw=1)
        ax.set_title(f"{layout}, N={LENGTHS[-1]}")
        ax.set_xlabel("head dim")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("extra memory / bytes of q+k+v")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Extra device memory per attention call on {torch.cuda.get_device_name()} (dashed: our 0.6x bound)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m comfy_sage.bench.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.memory measures device memory: it needs a CUDA GPU")
    import triton

    rows = run()
    ours = [v for r in rows for k, v in r.items() if k.startswith("ours_")]
    result = dict(env=dict(torch=torch.__version__, triton=triton.__version__, gpu=torch.cuda.get_device_name()),
                  contract=CONTRACT, worst_ours=max(ours), rows=rows)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", result["env"]["gpu"]).strip("-").lower()
    stem = os.path.join(args.out, f"memory-{tag}-{datetime.date.today().isoformat()}")
    os.makedirs(args.out, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, stem + ".png")
    print(f"worst of ours: {max(ours)}x q+k+v (contract {CONTRACT}x); wrote {stem}.json")
    return 0 if max(ours) <= CONTRACT else 1


if __name__ == "__main__":
    raise SystemExit(main())
