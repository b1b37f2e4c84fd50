"""Extra device memory of one attention call: the peak bytes allocated while it runs, beyond its inputs and what
it returns (output, LSE), as a multiple of the bytes of q+k+v. Ours on every P·V path, with and without the LSE, in
each layout (HND contiguous, NHD contiguous, NHD views of one fused [B, N, 3·H·D] projection as ComfyUI and
diffusers hand them) and head dim; SDPA's default, SageAttention 2 and comfy-kitchen in the same process where they
import (`../shared/peers/`). Our contract: at most 0.6x (kernels/_quant.py).

    python -m comfy_sage.bench.memory [--out bench/results]     (CUDA GPU)

`--comfy`: the peak device memory (torch.cuda.max_memory_allocated, reset before the call, so q, k, v count) of one
ComfyUI-shaped self-attention call, Wan 2.x 14B at 720p by default: q, k, v each [1, 75600, 5120] bf16 (40 heads of
128) as core's attention functions receive them (heads=40, skip_reshape False), through (a) SDPA as core calls it on
plain tensors (reshape to heads, F.scaled_dot_product_attention, reshape back), (b) our override on plain tensors
(ComfyUI 0.3.6x: core's wrapper holds q, k, v), (c) our `container_function` on current core's containers, on its
config's first call in the process (q, k, v kept until the kernel returns) and on a warm config (each released once
quantized), for pv auto and fp16. Bytes and ratios to (a); JSON under --out. `--smoke`: the same code on CPU through
Triton's interpreter at a tiny shape (no memory figures; checks that (b) and (c) agree).

    python -m comfy_sage.bench.memory --comfy [--out bench/results] [--tokens 75600]     (CUDA GPU)
    python -m comfy_sage.bench.memory --comfy --smoke                                    (CPU)
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


class Box:
    """A minimal stand-in of core's AttentionTensorContainer: one owner of a tensor on its way into attention."""
    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor

    def peek(self):
        return self.tensor

    def take(self):
        tensor, self.tensor = self.tensor, None
        return tensor


def core_sdpa(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """Core's attention_pytorch for these calls: [B, N, H·D] to heads, SDPA, back to [B, N, H·D]."""
    b, dim_head = q.shape[0], q.shape[-1] // heads
    q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, heads * dim_head)


def comfy_peaks(tokens=75600, heads=40, dim_head=128, dtype=torch.bfloat16, device="cuda", pvs=("auto", "fp16")):
    """Rows {path, pv, peak_bytes, peak_over_inputs, ratio_to_sdpa, ...} for one self-attention call of `tokens`
    tokens (module docstring). Every path is warmed up first (compilation, SDPA's workspace), except where the row
    measures a config's first call, which runs after `_fallback.forget()` (the kernels stay compiled). On CPU
    (`device="cpu"`, under TRITON_INTERPRET=1) the byte counts are None."""
    from ..kernels import _fallback
    from ..nodes import _runtime

    cuda = torch.device(device).type == "cuda"
    shape = (1, tokens, heads * dim_head)
    one = tokens * heads * dim_head * torch.tensor([], dtype=dtype).element_size()

    def inputs():
        g = torch.Generator(device=device).manual_seed(0)
        return [torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3)]

    def measure(call):
        """(peak bytes, bytes allocated when it started, the output's first tokens): `call(tensors)` gets the list of
        q, k, v, which the caller may empty."""
        tensors = inputs()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        out = call(tensors)
        del tensors
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        head = out[:, :64].clone()
        del out
        return (peak, base, head) if cuda else (None, None, head)

    def plain(fn):
        return lambda t: fn(*t)

    def containers(state):
        def call(t):
            boxes = [Box(x) for x in t]
            t.clear()
            return state.container_function(*boxes, heads, transformer_options={})
        return call

    rows = []

    def row(path, pv, call, warm=True, first=False):
        if warm:
            measure(call)
        if first:
            _fallback.forget()
        peak, base, head = measure(call)
        r = dict(path=path, pv=pv, peak_bytes=peak, inputs_bytes=base,
                 peak_over_inputs=None if peak is None else peak - base,
                 peak_in_one_tensor=None if peak is None else round(peak / one, 3))
        rows.append(r)
        print(r, flush=True)
        return head

    sdpa = row("sdpa", None, plain(lambda q, k, v: core_sdpa(q, k, v, heads)))
    heads_out, paths = {}, {}
    for pv in pvs:
        state = _runtime.SageState(True, pv, None, False, {"family": None, "num_blocks": None}, label="bench")
        heads_out[(pv, "plain")] = row("ours_plain", pv, plain(lambda q, k, v: state(core_sdpa, q, k, v, heads,
                                                                                          transformer_options={})))
        heads_out[(pv, "first")] = row("ours_containers_first_call", pv, containers(state), warm=False, first=True)
        heads_out[(pv, "warm")] = row("ours_containers", pv, containers(state))
        paths[pv] = dict(state.run["paths"])  # what ran: one 8-bit path, no fallback
    for r in rows:
        if cuda:
            r["ratio_to_sdpa"] = round(r["peak_bytes"] / rows[0]["peak_bytes"], 4)
    agree = {pv: bool(torch.equal(heads_out[(pv, "plain")], heads_out[(pv, "warm")])
                      and torch.equal(heads_out[(pv, "plain")], heads_out[(pv, "first")])) for pv in pvs}
    err = {pv: float((heads_out[(pv, "warm")].float() - sdpa.float()).abs().max()) for pv in pvs}
    eight_bit = {pv: len(p) == 1 and next(iter(p)).startswith("int8-") for pv, p in paths.items()}
    return dict(shape=dict(tokens=tokens, heads=heads, dim_head=dim_head, dtype=str(dtype).replace("torch.", ""),
                           one_tensor_bytes=one),
                rows=rows, paths=paths, ok=all(agree.values()) and all(eight_bit.values()), outputs_agree=agree,
                max_abs_err_vs_sdpa_first_64_tokens=err)


def comfy_main(args):
    if args.smoke:
        if not torch.cuda.is_available():
            import sys

            if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
                raise SystemExit("--smoke on CPU needs TRITON_INTERPRET=1 before triton is imported")
            os.environ.setdefault("TRITON_INTERPRET", "1")
        res = comfy_peaks(tokens=args.tokens or 192, heads=2, dim_head=32, device="cpu")
        print(json.dumps({k: v for k, v in res.items() if k != "rows"}))
        return 0 if res["ok"] else 1
    if not torch.cuda.is_available():
        raise SystemExit("--comfy measures device memory: it needs a CUDA GPU (or --smoke on CPU)")
    import triton

    res = comfy_peaks(tokens=args.tokens or 75600)
    res["env"] = dict(torch=torch.__version__, triton=triton.__version__, gpu=torch.cuda.get_device_name())
    tag = re.sub(r"[^A-Za-z0-9]+", "-", res["env"]["gpu"]).strip("-").lower()
    path = os.path.join(args.out, f"memory-comfy-{tag}-{datetime.date.today().isoformat()}.json")
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    for r in res["rows"]:
        print(f"{r['path']:<28} pv={str(r['pv']):<5} peak {r['peak_bytes'] / 2**30:7.3f} GiB "
              f"({r['peak_in_one_tensor']} x one of q/k/v), {r['ratio_to_sdpa']:.3f}x SDPA")
    print(f"paths: {res['paths']}; outputs agree: {res['outputs_agree']}; wrote {path}")
    return 0 if res["ok"] else 1


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m comfy_sage.bench.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--comfy", action="store_true", help="peak memory of one ComfyUI-shaped Wan 720p self-attention "
                    "call: SDPA, our override on plain tensors, on core's containers")
    ap.add_argument("--tokens", type=int, default=None, help="--comfy: tokens per call (75600: Wan 720p, 81 frames)")
    ap.add_argument("--smoke", action="store_true", help="--comfy on CPU through Triton's interpreter, tiny shape")
    args = ap.parse_args(argv)
    if args.comfy:
        return comfy_main(args)
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
