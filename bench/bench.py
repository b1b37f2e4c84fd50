"""Kernel benchmark: `python -m comfy_sage bench` (on a machine without CUDA: the accuracy table alone, at a small
size through Triton's interpreter).

The grid and TOPS formula of shared/anchors/h100.md: fp16, HND, B = max(1, 16384 // N), H = 32 (D=64) or 24
(D=128), TOPS = 4·B·H·N²·D / time, halved for causal; 8-bit columns include their own quantization. Every run
measures SDPA's flash, efficient and cuDNN backends in the same process. Accuracy vs fp32 on `randn` and `kbias`
inputs (B=1, H=8, N=4096). Writes bench/results/<gpu>-<date>.json and .png and prints ratios.
"""
import datetime
import json
import math
import os
import random
import re

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..kernels import sage_attention, sage_sdpa
from ..kernels import _api, _arch, _quant
from .clocks import Clocks

GRID_N = (1024, 2048, 4096, 8192, 16384, 32768)
SDPA = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}


def grid(quick=False, ns=None):
    for D in (64, 128):
        H = 32 if D == 64 else 24
        for N in ns or ((4096, 16384) if quick else GRID_N):
            for causal in (False, True):
                yield dict(B=max(1, 16384 // N), H=H, N=N, D=D, causal=causal)


def methods():
    m = {name: (lambda be: lambda q, k, v, c: _sdpa_with(be, q, k, v, c))(be) for name, be in SDPA.items()}
    m["sdpa_default"] = lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c)
    m["sage_fp16pv"] = lambda q, k, v, c: sage_attention(q, k, v, is_causal=c, pv="fp16")
    m["sage_fp8pv"] = lambda q, k, v, c: sage_attention(q, k, v, is_causal=c, pv="fp8")
    m["sage_int8pv"] = lambda q, k, v, c: sage_attention(q, k, v, is_causal=c, pv="int8")
    m["sage_fine"] = lambda q, k, v, c: sage_attention(q, k, v, is_causal=c, pv="fine")
    m["sage_auto"] = lambda q, k, v, c: sage_attention(q, k, v, is_causal=c)
    m["sage_sdpa"] = lambda q, k, v, c: sage_sdpa(q, k, v, is_causal=c)
    try:  # SageAttention 2 (../shared/peers/)
        from sageattention import sageattn

        m["sageattention_pypi"] = lambda q, k, v, c: sageattn(q, k, v, is_causal=c, tensor_layout="HND")
    except ImportError:
        pass
    try:  # comfy-kitchen's INT8 attention, ComfyUI core's since August 2026 (../shared/peers/)
        from comfy_kitchen import int8_attention

        m["comfy_kitchen_int8"] = lambda q, k, v, c: _full_only(int8_attention, q, k, v, c)
    except ImportError:
        pass
    return m


def _full_only(fn, q, k, v, causal):
    if causal:  # reported as the shape's error, not timed: a mask tensor would time another kernel
        raise NotImplementedError("no causal flag (ComfyUI's models run full attention)")
    return fn(q, k, v)


def _sdpa_with(backend, q, k, v, causal):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


META = ("B", "H", "N", "D", "causal", "errors", "clocks")  # a grid row's keys that are not methods


def tops(s, ms):
    return 4 * s["B"] * s["H"] * s["N"] ** 2 * s["D"] / (ms * 1e-3) / 1e12 * (0.5 if s["causal"] else 1.0)


def _time(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


# The accuracy table's hard inputs (issue 14; bf16, as the H200 anchors measured them): a q channel that carries a
# large offset in every token, and near one-hot rows (logits q·k/√D of std ONEHOT_SCALE² = 36).
QOUT_OFFSET = 60.0
ONEHOT_SCALE = 6.0
KINDS = {"randn": torch.float16, "kbias": torch.float16, "qoutlier": torch.bfloat16, "onehot": torch.bfloat16}


def inputs(s, kind="randn", dtype=torch.float16, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (s["B"], s["H"], s["N"], s["D"])
    q, k, v = (torch.randn(shape, device=device, generator=g) for _ in range(3))
    if kind == "kbias":  # per-channel offset shared by all tokens (std 8), q doubled
        k = k + 8 * torch.randn((1, s["H"], 1, s["D"]), device=device, generator=g)
        q = q * 2
    elif kind == "qoutlier":
        q[..., 0] += QOUT_OFFSET
    elif kind == "onehot":
        q, k = q * ONEHOT_SCALE, k * ONEHOT_SCALE
    elif kind != "randn":
        raise ValueError(f"unknown input kind {kind!r}: one of {', '.join(KINDS)}")
    return q.to(dtype), k.to(dtype), v.to(dtype)


def local_inputs(frames, height, width, heads, D, *, strength=4.0, length=2.0, seed=0, dtype=torch.float16,
                 device="cuda"):
    """q, k, v [1, heads, frames·height·width, D] with space-time locality, tokens in frame-major raster order (as
    video models flatten their latents; Wan 720p: 21 × 45 × 80). q and k share random Fourier features of each
    token's (frame, row, column) plus noise, so a logit is about strength² · mean cos(ω·Δposition) with ω ~
    N(0, 1/length²) per head: largest around a token's own position, fading over `length` positions; v is noise.
    At the Wan 720p shape, strength 4 puts most of each row's mass near its token (sparse attention's regime: the
    top 10% of key blocks by pooled score leave a relative L1 of 0.02); at 3 the far tokens' small logits add up
    to most of the mass (the top 50% leave 0.4), a diffuse case where skipping blocks cannot be accurate."""
    g = torch.Generator(device=device).manual_seed(seed)
    grid_ = torch.meshgrid(*(torch.arange(n, device=device) for n in (frames, height, width)), indexing="ij")
    pos = torch.stack(grid_, -1).reshape(-1, 3).float()
    N = pos.shape[0]
    omega = torch.randn(heads, D // 2, 3, generator=g, device=device) / length
    angle = torch.einsum("hfc,nc->hnf", omega, pos)
    feat = torch.cat([angle.cos(), angle.sin()], -1) * (strength * D ** 0.25 / math.sqrt(D / 2))
    q, k = (feat + torch.randn(heads, N, D, generator=g, device=device) / D ** 0.25 for _ in range(2))
    v = torch.randn(heads, N, D, generator=g, device=device)
    return tuple(t[None].to(dtype) for t in (q, k, v))


def metrics(out, ref):
    o, r = out.float().flatten(), ref.float().flatten()
    return [round(F.cosine_similarity(o, r, dim=0).item(), 6), round(((o - r).abs().sum() / r.abs().sum()).item(), 6),
            round(((o - r) ** 2).mean().sqrt().item(), 6)]


def speed(ms_, quick=False, names=None, rounds=3, ns=None):
    """TOPS per grid shape and method, and under "clocks" the SM clock and board power nvidia-smi read during each
    method's kept timing (bench/clocks.py). Methods are timed in turn, `rounds` times, keeping each one's best median:
    one pass per method drifted by 5-10% between methods with the clock and temperature, and in a fixed order a
    method measured up to 9% off at short shapes by what ran before it (bench/NOTES.md), so each round takes the
    methods in a new (seeded) order."""
    rows, rng = [], random.Random(0)
    for s in grid(quick, ns):
        q, k, v = inputs(s)
        row, best, order = dict(s), {}, list(ms_.items())
        for _ in range(rounds):
            rng.shuffle(order)
            for name, fn in order:
                if (names and name not in names) or name in row.get("errors", {}):
                    continue
                try:
                    with Clocks(torch.cuda.current_device()) as clk:
                        ms = _time(lambda: fn(q, k, v, s["causal"]))
                    if ms < best.get(name, math.inf):
                        best[name] = ms
                        row.setdefault("clocks", {})[name] = clk.summary()
                except Exception as e:  # a backend that does not run this shape is reported, not fatal
                    row.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:200]
        for name in ms_:
            if not names or name in names:
                row[name] = round(tops(s, best[name]), 1) if name in best else None
        rows.append(row)
        print(_fmt(row), flush=True)
        del q, k, v
    return rows


def accuracy(ms_, n=4096, heads=8, device="cuda"):
    rows = []
    for kind, dtype in KINDS.items():
        for D in (64, 128):
            for causal in (False, True):
                s = dict(B=1, H=heads, N=n, D=D, causal=causal)
                q, k, v = inputs(s, kind, dtype=dtype, seed=1, device=device)
                with sdpa_kernel([SDPBackend.MATH]):
                    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
                row = dict(kind=kind, D=D, causal=causal)
                for name, fn in ms_.items():
                    if name != "sdpa_efficient" and name.startswith("sdpa"):
                        continue
                    try:
                        row[name] = metrics(fn(q, k, v, causal), ref)
                    except NotImplementedError:  # a peer without this mask (comfy-kitchen: no causal flag)
                        row[name] = None
                rows.append(row)
                print(row, flush=True)
    return rows


def robustness():
    """bf16 with |v| up to 6e4 and large q/k: every output finite where SDPA's is."""
    res = []
    for pv in ("fp16", "fp8"):
        for causal in (False, True):
            s = dict(B=1, H=8, N=4096, D=128, causal=causal)
            q, k, v = inputs(s, dtype=torch.bfloat16, seed=2)
            v = (v.float() * 2e4).clamp(-6e4, 6e4).to(torch.bfloat16)
            q, k = q * 30, k * 30
            out = sage_attention(q, k, v, is_causal=causal, pv=pv)
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            res.append(dict(pv=pv, causal=causal, finite=bool(out.isfinite().all()),
                            sdpa_finite=bool(ref.isfinite().all()), rel_l1=metrics(out, ref)[1]))
            print(res[-1], flush=True)
    return res


def sweep(shapes, tiles, pvs=("fp16", "fp8")):
    """TOPS of each tile for the given shapes (tuning the arch table)."""
    rows = []
    for s in shapes:
        q, k, v = inputs(s)
        for pv in pvs:
            dims = (s["B"], s["H"], s["H"], s["N"], s["N"], s["D"], s["D"])
            ms = _time(lambda: _quant.quantize(q, k, v, dims=dims, scale=1.0, block_m=64, block_n=128,
                                               fp8_v=pv == "fp8"))
            rows.append(dict(s, pv=pv, quant_ms=round(ms, 4)))
            print(rows[-1], flush=True)
            for t in tiles:
                try:
                    ms = _time(lambda: _api._forward(q, k, v, "HND", s["causal"], None, pv, False, tile=t))
                    r = round(tops(s, ms), 1)
                except Exception as e:
                    r = f"{type(e).__name__}: {str(e)[:80]}"
                rows.append(dict(s, pv=pv, tile=[t.block_m, t.block_n, t.num_warps, t.num_stages, t.tma], tops=r))
                print(rows[-1], flush=True)
    return rows


def _fmt(row):
    keys = [k for k in row if k not in META]
    head = f"D={row['D']:<3} N={row['N']:<5} {'causal' if row['causal'] else 'full  '}"
    return head + " " + " ".join(f"{k}={row[k]}" for k in keys)


def ratio_table(rows):
    lines = ["| D | N | mask | best sage (TOPS) | path | x cuDNN | x FA2 | x SageAttention 2 | x comfy-kitchen | "
             "sage_sdpa x best SDPA |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sage = {k: r[k] for k in ("sage_fp16pv", "sage_fp8pv", "sage_int8pv", "sage_fine") if r.get(k)}
        if not sage:
            continue
        best_name = max(sage, key=sage.get)
        best = sage[best_name]
        best_sdpa = max(r[k] for k in ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_default") if r.get(k))
        x = {k: f"{best / r[k]:.2f}" if r.get(k) else "-"
             for k in ("sdpa_cudnn", "sdpa_flash", "sageattention_pypi", "comfy_kitchen_int8")}
        lines.append(f"| {r['D']} | {r['N']} | {'causal' if r['causal'] else 'full'} | {best} | {best_name[5:]} | "
                     f"{' | '.join(x.values())} | {(r.get('sage_sdpa') or 0) / best_sdpa:.2f} |")
    return "\n".join(lines)


def plot(rows, path, gpu=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one colour per method across the panels (the default cycle of ten gave SDPA and the peers the same ones);
    # SDPA's backends dashed, the peers dotted, ours solid
    names = list(dict.fromkeys(k for r in rows for k in r if k not in META))
    colors = dict(zip(names, plt.get_cmap("tab20").colors))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for ax, (D, causal) in zip(axes.flat, [(64, False), (64, True), (128, False), (128, True)]):
        sel = [r for r in rows if r["D"] == D and r["causal"] == causal]
        for name in names:
            style = "--" if name.startswith("sdpa_") else "-" if name.startswith("sage_") else ":"
            ax.plot([r["N"] for r in sel], [r.get(name) or float("nan") for r in sel], style, marker="o",
                    color=colors[name], label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"head dim {D}, {'causal' if causal else 'full'}")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TOPS")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="center right", fontsize=8)
    fig.suptitle(f"comfy_sage vs SDPA on {gpu or torch.cuda.get_device_name()} (fp16, quantization included)")
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    fig.savefig(path, dpi=110)


def cpu_accuracy(n=256, heads=2):
    """No GPU: the accuracy table of the 8-bit paths at a small size, through Triton's interpreter (the same
    arithmetic as on a GPU; short rows average fewer keys, so errors run a little higher than at N=4096)."""
    if _arch.arch_of(torch.device("cpu")) is None:
        print("bench: no CUDA GPU, and TRITON_INTERPRET=0 keeps the kernels off the CPU: nothing to measure")
        return 2
    print(f"No CUDA GPU: speed needs one. Accuracy against fp32 (cosine, relative L1, RMSE) through Triton's "
          f"interpreter, B=1, H={heads}, N={n}:", flush=True)
    accuracy({f"sage_{pv}": (lambda pv: lambda q, k, v, c: sage_attention(q, k, v, is_causal=c, pv=pv))(pv)
              for pv in ("fp16", "fp8", "fine", "int8")}, n=n, heads=heads, device="cpu")
    return 0


def environment():
    """What a GPU result ran on: torch, Triton, the GPU and `doctor` (the ptxas release too: the same Triton's code
    differs between them)."""
    import triton

    return dict(torch=torch.__version__, triton=triton.__version__, gpu=torch.cuda.get_device_name(),
                doctor=_arch.doctor())


def run(args):
    """`python -m comfy_sage bench`, from the arguments comfy_sage/__main__.py declares (no torch needed to parse)."""
    if not torch.cuda.is_available():
        return cpu_accuracy(args.cpu_n)
    result = dict(env=environment())
    if args.sweep:
        T = _arch.Tile
        tiles = [T(64, 128, 4, 2, True), T(64, 128, 4, 3, True), T(64, 64, 4, 3, True), T(64, 64, 4, 4, True),
                 T(128, 128, 8, 2, True), T(128, 128, 8, 3, True), T(128, 64, 4, 3, True), T(64, 128, 4, 3)]
        shapes = [dict(B=1, H=H, N=16384, D=D, causal=c) for D, H in ((64, 32), (128, 24)) for c in (False, True)]
        result["sweep"] = sweep(shapes, tiles)
    else:
        ms_ = methods()
        if not args.accuracy_only:
            result["speed_tops"] = speed(ms_, args.quick, ns=args.n and [int(n) for n in args.n.split(",")])
        if not args.skip_accuracy:
            result["accuracy_cos_l1_rmse"] = accuracy(ms_)
            result["robustness_bf16"] = robustness()
        if "speed_tops" in result:
            print(ratio_table(result["speed_tops"]))
    os.makedirs(args.out, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", result["env"]["gpu"]).strip("-").lower()
    kind = "-sweep" if args.sweep else "-accuracy" if args.accuracy_only else ""
    stem = os.path.join(args.out, f"{tag}-{datetime.date.today().isoformat()}{kind}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    if "speed_tops" in result:
        plot(result["speed_tops"], stem + ".png")
    print("wrote", stem + ".json")
    return 0
