"""GPU check of the ComfyUI nodes (run by hand on the GPU machine; not collected by pytest):

    COMFYUI_PATH=/path/to/ComfyUI python tests/comfyui/gpu_sampling_check.py --json out.json [--layers 30 ...]

Real ComfyUI sampling (`comfy.sample.sample`, euler, CFG 5) of a Wan-2.1-shaped model built from ComfyUI's own
classes with random weights (default: the 1.3B shape, dim 1536, 12 heads of 128, 30 layers; 81 frames at 480x832
= 32,760 video tokens, as in the README's diffusers figure), so self-attention is past the arch table's
short-sequence threshold and runs 8-bit while cross-attention over the 512 prompt tokens stays SDPA. It samples
once through `Apply SageAttention (enabled=off)` (default attention, timed by the same wrappers) and once through
`Apply SageAttention`, same seed, and reports the sampling time of both, which attention paths ran (the node's
record and the kernel counters), and the Compare Latents node's PSNR between the two outputs; then tiny Flux and
SD1.5-style UNet models are sampled the same way with the threshold lowered to 0 (stated in the JSON) so their
short sequences run the kernel too.

The model is set up as ComfyUI's loader does it (`comfy.sd.load_diffusion_model_state_dict`): weight dtype fp16,
`manual_cast_dtype = model_management.unet_manual_cast(...)` (None on a GPU that computes in fp16), operations
picked from those by `model_base.BaseModel` (`comfy.ops.pick_operations`), and the weights written into the
modules ComfyUI created, so Wan's patch embedding stays in fp32 as ComfyUI creates it (its forward feeds it
`x.float()`). Casting the whole model to fp16 afterwards is what broke the earlier version of this check.

`--device cpu` runs the same path on CPU with the Triton interpreter at a tiny size (a smoke test of the script;
size flags not given take CPU_SMOKE's values there).

Each sampling run's wall time is printed as it ends; `--peak-memory` (CUDA) also records each run's
`torch.cuda.max_memory_allocated` (peak stats reset before the run; the weights resident at that moment are recorded
beside it). The Wan-14B shape at 720p (75,600 video tokens), a few layers of it:

    ... --dim 5120 --heads 40 --ffn 13824 --layers 4 --height 720 --width 1280 --steps 2 --repeats 1 --no-tiny
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

_cpu = "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1:][:1] == ["cpu"]
os.environ["TRITON_INTERPRET"] = "1" if _cpu else os.environ.get("TRITON_INTERPRET", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import conftest as C  # noqa: E402

TEXT_LEN, TEXT_DIM = 512, 4096
# Size flags: the GPU defaults (Wan-1.3B at 480p, 81 frames) and the CPU smoke run's (the interpreter runs every
# kernel in numpy, so a few dozen video tokens, two layers and one timed run are what stays within a minute or two).
GPU_DEFAULTS = dict(dim=1536, heads=12, layers=30, ffn=8960, text_dim=TEXT_DIM, frames=81, height=480, width=832,
                    steps=4, repeats=2)
CPU_SMOKE = dict(dim=128, heads=2, layers=2, ffn=256, text_dim=64, frames=5, height=64, width=64, steps=2,
                 repeats=1)


def init_weights(module, seed=0, std=0.02):
    """Seeded random weights written in place on the module's own device and dtype (ComfyUI's modules keep theirs:
    Wan's patch embedding is fp32 in an fp16 model)."""
    dev = next(module.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g, device=dev) * std)
            elif name.endswith("weight") and "norm" in name.lower():
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=dev) * 0.01)


def build_wan(dim, layers, heads, ffn, text_dim, dtype, device):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    uc = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": TEXT_LEN, "in_dim": 16,
          "dim": dim, "ffn_dim": ffn, "freq_dim": 256, "text_dim": text_dim, "out_dim": 16, "num_heads": heads,
          "num_layers": layers, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}
    cfg = sm.WAN21_T2V(uc)
    if device.type == "cuda":
        manual_cast = mm.unet_manual_cast(dtype, device, cfg.supported_inference_dtypes)
    else:  # ComfyUI would pick fp32 compute on CPU; keep the GPU's choice so the CPU smoke run takes the same path
        manual_cast = None
    cfg.set_inference_dtype(dtype, manual_cast)  # as comfy.sd.load_diffusion_model_state_dict does
    model = cfg.get_model({}, device=device)
    init_weights(model.diffusion_model)
    dm = model.diffusion_model
    q = dm.blocks[0].self_attn.q
    info = {"weight_dtype": str(dtype), "manual_cast_dtype": str(manual_cast),
            "operations": f"{type(q).__module__}.{type(q).__qualname__}", "block_dtype": str(q.weight.dtype),
            "patch_embedding_dtype": str(dm.patch_embedding.weight.dtype),
            "params": sum(p.numel() for p in dm.parameters())}
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    return patcher, info


def sample_wan(model, frames, h, w, steps, seed, dtype, text_dim):
    import comfy.sample

    lat = torch.zeros(1, 16, (frames - 1) // 4 + 1, h // 8, w // 8)
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, TEXT_LEN, text_dim, generator=g).to(dtype), {}]]
    neg = [[torch.randn(1, TEXT_LEN, text_dim, generator=g).to(dtype), {}]]
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "simple", pos, neg, lat, seed=seed,
                               disable_pbar=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats, device, label, before=None, peak=False):
    """Warm-up (Triton compile, cuDNN autotune), then the median wall time of `repeats` runs; returns the last
    output, the median, the timed runs' times and, with `peak` (CUDA), every run's memory record, warm-up first.
    `before` runs ahead of every run (outside the timing). Each run's time is printed as it ends, so a run cut
    short by a time limit still leaves the runs before it in the log."""
    ts, mem, out = [], [], None
    for i in range(repeats + 1):
        if before:
            before()
        sync(device)
        if peak:
            resident = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        t = time.perf_counter() - t0
        run = "warm-up" if i == 0 else f"run {i}/{repeats}"
        line = f"  {label} {run}: {t:.3f} s"
        if i:
            ts.append(t)
        if peak:
            p = torch.cuda.max_memory_allocated(device)
            mem.append({"run": run, "peak_bytes": p, "resident_before_bytes": resident,
                        "peak_gib": round(p / 2 ** 30, 3), "above_resident_gib": round((p - resident) / 2 ** 30, 3)})
            line += f", peak {p / 2 ** 30:.2f} GiB ({(p - resident) / 2 ** 30:.2f} above the " \
                    f"{resident / 2 ** 30:.2f} GiB resident before it)"
        print(line, flush=True)
    return out, statistics.median(ts), ts, mem


@contextlib.contextmanager
def min_pairs_lowered(arch_module, value):
    """Lower sage_sdpa's short-sequence threshold on every arch entry (restored on exit)."""
    saved = dict(arch_module.ARCHES)
    try:
        for k, e in saved.items():
            arch_module.ARCHES[k] = e.with_threshold(value)
        yield
    finally:
        arch_module.ARCHES.clear()
        arch_module.ARCHES.update(saved)


def model_time(state):
    return float(sum(state.run["steps"].values()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="write the results here")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    for k in GPU_DEFAULTS:  # default None: filled from GPU_DEFAULTS or, with --device cpu, CPU_SMOKE
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None,
                        help=f"default {GPU_DEFAULTS[k]} (CPU smoke run: {CPU_SMOKE[k]})")
    ap.add_argument("--peak-memory", action="store_true",
                    help="record torch.cuda.max_memory_allocated of every sampling run (CUDA only)")
    ap.add_argument("--pv", default="auto", choices=["auto", "fp16", "fp8"])
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"], help="weight (and compute) dtype")
    ap.add_argument("--min-pairs", type=int, default=None,
                    help="lower sage_sdpa's short-sequence threshold for the Wan run (default: the arch table's)")
    ap.add_argument("--no-tiny", action="store_true", help="skip the tiny Flux / UNet runs")
    a = ap.parse_args()
    for k, v in (CPU_SMOKE if a.device == "cpu" else GPU_DEFAULTS).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --device cpu for a smoke run)")
    C.comfy_import(cpu=dev.type == "cpu")
    import comfy.model_management as mm

    pack = C.load_pack()
    M = pack.NODE_CLASS_MAPPINGS
    kernels, arch = pack.kernels, pack.kernels._arch
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)",
           "comfy_device": str(mm.get_torch_device()), "torch": torch.__version__,
           "comfyui": _comfyui_version(), "doctor": kernels.doctor(), "args": vars(a)}
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        res["triton"] = None
    print(f"device {res['device']}, torch {torch.__version__}, triton {res['triton']}, ComfyUI {res['comfyui']}, "
          f"ComfyUI device {res['comfy_device']}", flush=True)

    # ---- Wan-shaped model: default attention vs Apply SageAttention --------------------------------------------
    t0 = time.perf_counter()
    base, info = build_wan(a.dim, a.layers, a.heads, a.ffn, a.text_dim, dtype, dev)
    info["build_s"] = round(time.perf_counter() - t0, 2)
    print(f"built Wan-shaped model: {info}", flush=True)
    default, = M["ApplySageAttention"]().apply(base, enabled=False, pv=a.pv)
    sage, = M["ApplySageAttention"]().apply(base, enabled=True, pv=a.pv)
    run = (a.frames, a.height, a.width, a.steps, 0, dtype, a.text_dim)
    tokens = ((a.frames - 1) // 4 + 1) * (a.height // 16) * (a.width // 16)
    entry = arch.arch_of(dev)
    threshold = entry.sdpa_below(a.dim // a.heads, False) if entry is not None else None
    lowered = contextlib.nullcontext() if a.min_pairs is None else min_pairs_lowered(arch, a.min_pairs)
    peak = a.peak_memory and dev.type == "cuda"
    print(f"sampling {tokens} video tokens, {a.layers} layers, {a.steps} steps, warm-up + {a.repeats} runs each",
          flush=True)
    with lowered:
        ref, t_ref, ts_ref, mem_ref = timed(lambda: sample_wan(default, *run), a.repeats, dev, "default", peak=peak)
        out, t_sage, ts_sage, mem_sage = timed(lambda: sample_wan(sage, *run), a.repeats, dev, "sage",
                                               before=kernels.reset_counters, peak=peak)
        kernel_counts = kernels.counters()
    st, st_ref = sage.model_options["transformer_options"]["comfy_sage_state"], \
        default.model_options["transformer_options"]["comfy_sage_state"]
    _, metrics = M["SageAttentionCompareLatents"]().compare({"samples": ref}, {"samples": out}, default,
                                                              sage)["result"]
    m = pack.nodes._metrics.compare(ref, out, channels_last=False)  # the numbers behind the node's text
    paths = dict(st.run["paths"])
    eight = sum(c for p, c in paths.items() if p.startswith("int8"))
    wan = {"shape": {"dim": a.dim, "heads": a.heads, "head_dim": a.dim // a.heads, "layers": a.layers,
                     "frames": a.frames, "height": a.height, "width": a.width, "video_tokens": tokens,
                     "text_tokens": TEXT_LEN, "steps": a.steps, "cfg": 5.0, "sampler": "euler/simple"},
           "model": info,
           "min_pairs": {"arch": entry.name if entry else None, "table": threshold, "used": a.min_pairs
                         if a.min_pairs is not None else threshold,
                         "self_pairs": tokens * tokens, "cross_pairs": tokens * TEXT_LEN},
           "time_s": {"default_median": round(t_ref, 4), "sage_median": round(t_sage, 4),
                      "default_runs": [round(t, 4) for t in ts_ref], "sage_runs": [round(t, 4) for t in ts_sage],
                      "speedup_wall": round(t_ref / t_sage, 4),
                      "default_model_time_last": round(model_time(st_ref), 4),
                      "sage_model_time_last": round(model_time(st), 4)},
           "peak_memory": {"default": mem_ref, "sage": mem_sage} if peak else None,
           "paths_last_run": paths, "kernel_counters_last_run": kernel_counts,
           "forwards_last_run": st.run["forwards"], "eight_bit_calls": eight,
           "compare_node": metrics,
           "psnr_db": None if m["psnr"] == float("inf") else round(m["psnr"], 3), "ssim": round(m["ssim"], 6),
           "max_abs": m["max_abs"], "mean_abs": m["mean_abs"], "finite": m["finite"]}
    res["wan"] = wan
    print(f"wan-shaped: {tokens} video tokens, default {t_ref:.3f}s, sage {t_sage:.3f}s, "
          f"speed-up {t_ref / t_sage:.3f}x (whole sampling, median of {a.repeats})", flush=True)
    print(f"  node paths (last run): {paths}; kernel counters: {kernel_counts}", flush=True)
    print(f"  compare node: {metrics}", flush=True)
    print(pack.nodes._runtime.summary(st, st_ref), flush=True)
    _write(a.json, res)

    # ---- tiny Flux and UNet with the threshold lowered: the nodes' other families on the GPU -----------------------
    if not a.no_tiny:
        res["tiny"] = {"min_pairs_used": 0}
        with min_pairs_lowered(arch, 0):
            for kind in ("flux", "unet"):
                try:
                    mdl = C.BUILDERS[kind](dtype)  # fp32 weights, fp16 compute through manual-cast ops
                    mdl.load_device = dev
                    d, = M["ApplySageAttention"]().apply(mdl, enabled=False, pv=a.pv)
                    s, = M["ApplySageAttention"]().apply(mdl, enabled=True, pv=a.pv)
                    r = C.sample(d, kind, dtype, steps=4)
                    o = C.sample(s, kind, dtype, steps=4)
                    mm_ = pack.nodes._metrics.compare(r, o, channels_last=False)
                    res["tiny"][kind] = {
                        "paths": dict(s.model_options["transformer_options"]["comfy_sage_state"].run["paths"]),
                        "psnr_db": None if mm_["psnr"] == float("inf") else round(mm_["psnr"], 3),
                        "finite": mm_["finite"], "max_abs": mm_["max_abs"]}
                except Exception as e:  # keep the Wan result; say what failed
                    res["tiny"][kind] = {"error": f"{type(e).__name__}: {e}"}
                print(f"tiny {kind}: {res['tiny'][kind]}", flush=True)
        _write(a.json, res)
    ok = wan["finite"] and eight > 0
    res["ok"] = ok
    _write(a.json, res)
    print(f"wrote {a.json}; {'OK' if ok else 'FAILED: no 8-bit call or non-finite output'}", flush=True)
    return 0 if ok else 1


def _comfyui_version():
    try:
        import comfyui_version

        return comfyui_version.__version__
    except Exception:
        return None


def _write(path, res):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
