"""Where a Triton upgrade's time goes: each 8-bit path's call split into its quantization pass (and, for FP8, the
V maximum pass inside it) and its attention launch alone (the call with the quantization replaced by the tensors
it returned), at the grid's shapes, with the compiled kernels' registers and spills. Run it once per Triton in one
device call and compare the JSONs (bench/NOTES.md, session 15): `OUT=dir python -m
comfy_sage.bench.experiments.triton_split`; `python -m comfy_sage.bench.experiments.triton_split plot OUT.png
LABEL=a.json ...` draws each run's quantization pass and whole call side by side."""
import json
import os
import sys

import torch
import triton
from triton.testing import do_bench

from ...kernels import _attention, _quant, sage_attention
from ..bench import environment, tops
from ..clocks import Clocks

PATHS = ("fp8", "int8", "fp16")
SHAPES = [(128, 24, 4096, False), (128, 24, 16384, False), (128, 24, 32768, False), (128, 24, 4096, True),
          (128, 24, 32768, True), (64, 32, 4096, False), (64, 32, 32768, False)]


def builds(fns=None):
    """Registers and spills of every compiled build of `fns` ((name, jit function) pairs; default: the package's
    kernels), read from Triton's caches (their layout differs between Tritons)."""
    if fns is None:
        fns = [("quant", _quant._quant_kernel), ("v_amax", _quant._v_amax_kernel), ("attn", _attention._attn_kernel)]
        try:
            from ...kernels import _attention_ws

            fns.append(("ws", _attention_ws._attn_ws_kernel))
        except Exception:  # noqa: BLE001 - a Triton without Gluon
            pass
    rows = []
    for name, fn in fns:
        for cache in getattr(fn, "device_caches", {}).values():
            kernels = cache[0] if isinstance(cache, tuple) else cache
            for key, kern in kernels.items():
                rows.append(dict(kernel=name, n_regs=getattr(kern, "n_regs", None),
                                 n_spills=getattr(kern, "n_spills", None), warps=kern.metadata.num_warps,
                                 maxnreg=getattr(kern.metadata, "maxnreg", None), key=str(key)[:300]))
    return rows


def split(q, k, v, pv, causal):
    """(quantization ms, V maximum ms or None, attention launch ms, whole call ms)."""
    seen = {}
    orig = _quant.quantize

    def spy(*a, **kw):
        seen["qz"], seen["kw"] = orig(*a, **kw), kw
        return seen["qz"]

    _quant.quantize = spy
    try:
        sage_attention(q, k, v, pv=pv, is_causal=causal)
    finally:
        _quant.quantize = orig
    kw = seen["kw"]
    t_quant = do_bench(lambda: orig(q, k, v, **kw), warmup=25, rep=200)
    t_amax = None
    if kw["fp8_v"]:
        B, Hq, Hkv, Nq, Nk, D, DP = kw["dims"]
        amax = torch.zeros((B, Hkv, DP), dtype=torch.float32, device=v.device)
        blk = max(16, 4096 // DP)
        t_amax = do_bench(lambda: _quant._v_amax_kernel[(triton.cdiv(Nk, blk * _quant.V_AMAX_BLOCKS), B * Hkv)](
            v, amax, v.stride(0), v.stride(1), v.stride(2), Hkv, Nk, D=D, DP=DP, BLOCK_K=blk,
            BLOCKS=_quant.V_AMAX_BLOCKS, num_warps=4), warmup=25, rep=200)
    _quant.quantize = lambda *a, **kw: seen["qz"]
    try:
        t_attn = do_bench(lambda: sage_attention(q, k, v, pv=pv, is_causal=causal), warmup=25, rep=300)
    finally:
        _quant.quantize = orig
    t_call = do_bench(lambda: sage_attention(q, k, v, pv=pv, is_causal=causal), warmup=25, rep=300)
    return t_quant, t_amax, t_attn, t_call


def main():
    out = os.environ.get("OUT", ".")
    rows = []
    for D, H, N, causal in SHAPES:
        B = max(1, 16384 // N)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn((B, H, N, D), device="cuda", generator=g, dtype=torch.float16) for _ in range(3))
        shape = dict(B=B, H=H, N=N, D=D, causal=causal)
        for pv in PATHS:
            with Clocks(torch.cuda.current_device()) as clk:
                t_quant, t_amax, t_attn, t_call = split(q, k, v, pv, causal)
            r = dict(shape, pv=pv, quant_ms=round(t_quant, 4), amax_ms=t_amax and round(t_amax, 4),
                     attn_ms=round(t_attn, 4), call_ms=round(t_call, 4), tops=round(tops(shape, t_call), 1),
                     clocks=clk.summary())
            print(r, flush=True)
            rows.append(r)
    res = dict(triton=triton.__version__, torch=torch.__version__, device=torch.cuda.get_device_name(),
               env=environment(), rows=rows,
               builds=builds())
    with open(os.path.join(out, f"triton-split-triton-{triton.__version__}.json"), "w") as f:
        json.dump(res, f, indent=1)


def plot(runs, path):
    """runs: label -> a JSON of main(). Two panels: the quantization pass (ms) and the whole call (TOPS), a bar
    per run at each shape and path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(runs.values()))["rows"]
    names = [f"hd{r['D']} {r['N'] // 1024}k\n{'causal' if r['causal'] else 'full'}\n{r['pv']}" for r in first]
    fig, axes = plt.subplots(2, 1, figsize=(14, 7), sharex=True)
    width = 0.8 / len(runs)
    for i, (label, res) in enumerate(runs.items()):
        x = [j + i * width for j in range(len(first))]
        axes[0].bar(x, [r["quant_ms"] for r in res["rows"]], width, label=label)
        axes[1].bar(x, [r["tops"] for r in res["rows"]], width, label=label)
    axes[0].set_ylabel("quantization pass (ms)")
    axes[1].set_ylabel("whole call (TOPS)")
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(first))])
    axes[1].set_xticklabels(names, fontsize=7)
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"{first and next(iter(runs.values()))['device']}: each path's call split, one process a run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    if sys.argv[1:2] == ["plot"]:
        plot({a.split("=", 1)[0]: json.load(open(a.split("=", 1)[1])) for a in sys.argv[3:]}, sys.argv[2])
    else:
        main()
