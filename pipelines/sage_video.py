"""One call that makes a video with 8-bit attention: `generate(prompt, ...)`.

    from comfy_sage.pipelines.sage_video import generate
    r = generate("a red fox running through snow", compare=True)     # embedded tiny Wan: seconds, anywhere
    r = generate("...", model="/models/Wan2.1-T2V-1.3B-Diffusers")   # a local diffusers folder
    print(r.path, r.median_step_s, r.counters, r.compare["speedup_per_step"])
"""
from __future__ import annotations

import os

import numpy as np
import torch

from . import _run

# pipeline class -> family; and each family's defaults (frames, height, width, steps, guidance, fps)
PIPELINES = {"WanPipeline": "wan", "CogVideoXPipeline": "cogvideox", "LTXPipeline": "ltx",
             "HunyuanVideoPipeline": "hunyuanvideo"}
DEFAULTS = {
    "tiny-wan": dict(num_frames=17, height=64, width=64, steps=8, guidance=5.0, fps=8),
    "wan": dict(num_frames=81, height=480, width=832, steps=50, guidance=5.0, fps=16),
    "cogvideox": dict(num_frames=49, height=480, width=720, steps=50, guidance=6.0, fps=8),
    "ltx": dict(num_frames=121, height=480, width=704, steps=50, guidance=3.0, fps=24),
    "hunyuanvideo": dict(num_frames=61, height=320, width=512, steps=50, guidance=6.0, fps=15),
}


def frame_and_size_rules(pipe):
    """(temporal factor T, spatial multiple S): the pipeline takes num_frames = T*k + 1 and H, W multiples of S."""
    t = int(getattr(pipe, "vae_scale_factor_temporal", 1) or 1)
    s = int(getattr(pipe, "vae_scale_factor_spatial", 8) or 8)
    tr = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.transformer_2
    ps = getattr(tr.config, "patch_size", 1) or 1
    ps = ps[1] if isinstance(ps, (tuple, list)) else ps
    return t, s * int(ps)


def check_frames_and_size(pipe, family, num_frames, height, width):
    t, s = frame_and_size_rules(pipe)
    if (num_frames - 1) % t:
        lo = (num_frames - 1) // t * t + 1
        raise ValueError(f"num_frames={num_frames} does not fit {family}: it takes {t}k+1 frames "
                         f"(e.g. {max(lo, 1)} or {lo + t})")
    for name, v in (("height", height), ("width", width)):
        if v % s:
            raise ValueError(f"{name}={v} does not fit {family}: it must be a multiple of {s} "
                             f"(e.g. {max(s, v // s * s)} or {v // s * s + s})")


def load(model, device, dtype):
    """(pipeline, family, label) for model=None (embedded tiny Wan) or a local diffusers folder."""
    from ._tiny import tiny_wan_pipeline

    return _run.load_model(model, device, dtype, PIPELINES, tiny_wan_pipeline, "tiny-wan", "tiny Wan")


def generate(prompt: str, *, model=None, num_frames: int | None = None, height: int | None = None,
             width: int | None = None, steps: int | None = None, guidance: float | None = None, seed: int = 0,
             attention: str = "sage", schedule=None, compare: bool = False, output_path: str | None = None,
             device=None, pv: str = "auto", negative_prompt: str | None = None, fps: int | None = None,
             progress: bool = True, pipeline=None, sparse=None, dense_steps: str = "") -> _run.RunResult:
    """Generate a video with 8-bit attention (attention="sage") or plain SDPA ("sdpa").

    model: None builds the embedded tiny Wan-style pipeline (random weights, local tokenizer, no downloads);
    a path loads a local diffusers folder (Wan 2.1/2.2, CogVideoX, LTX, HunyuanVideo; local files and
    safetensors only). `pipeline=` reuses an already built pipeline instead.
    schedule: a `Schedule` (or its dict/JSON) choosing steps/blocks/kinds that run 8-bit.
    sparse, dense_steps: block-sparse self-attention, as `enable_sage` takes them ("auto", "keep=F", "ratio=F";
    steps that stay dense); the report lists each sparse site's mean density.
    output_path: default outputs/comfy_sage_video.mp4 (.gif without imageio-ffmpeg), under the working directory.
    compare: also run SDPA with the same seed; writes `<out>.sdpa`, `<out>.side_by_side` (SDPA | sage),
    `<out>.diff` (|difference| x4) videos and `<out>.json` (timings, per-step speed-up, per-frame PSNR).
    Returns a RunResult: path, frames (uint8 [F, H, W, 3]), step_times, counters, compare...
    """
    schedule, dev = _run.check_request(prompt, attention, pv, seed, schedule, device, sparse, dense_steps)
    dtype = torch.bfloat16
    pipe, family, label = _run.pick_pipeline(pipeline, PIPELINES, lambda: load(model, dev, dtype))
    num_frames, height, width, steps, guidance, fps = _run.with_defaults(
        DEFAULTS[family], num_frames=num_frames, height=height, width=width, steps=steps, guidance=guidance, fps=fps)
    check_frames_and_size(pipe, family, num_frames, height, width)
    if schedule is not None:
        schedule.check(num_steps=steps)
    out_path = output_path or _run.default_video_path()
    if os.path.splitext(out_path)[1].lower() not in (".mp4", ".gif"):
        raise ValueError(f"output_path {out_path!r}: use a .mp4 or .gif file name")

    call = dict(prompt=prompt, num_frames=num_frames, height=height, width=width, num_inference_steps=steps,
                guidance_scale=guidance, output_type="np")
    if negative_prompt is not None:
        call["negative_prompt"] = negative_prompt
    if family == "tiny-wan":
        from ._tiny import TINY_WAN_TEXT_LEN

        call["max_sequence_length"] = TINY_WAN_TEXT_LEN

    def one(att):
        out, times, total, cnt, reports = _run.run_once(pipe, call, attention=att, pv=pv, schedule=schedule,
                                                         seed=seed, device=dev, progress=progress, label=att)
        frames = _run.to_uint8(out.frames[0])
        return _run.RunResult(None, frames, times, total, cnt, att, pv, seed, str(dev), str(dtype).split(".")[-1],
                              label, [str(r) for r in reports], densities=_run.densities(reports))

    runs = {}
    order = ("sdpa", "sage") if compare else (attention,)
    for att in order:
        runs[att] = one(att)
    res = runs[attention]
    res.path = _run.write_video(out_path, res.frames, fps)
    res.files["video"] = res.path
    if compare:
        other = runs["sdpa" if attention == "sage" else "sage"]
        sage, sdpa = runs["sage"], runs["sdpa"]
        other.path = _run.write_video(_run.sibling(out_path, other.attention), other.frames, fps)
        sbs = np.concatenate([sdpa.frames, sage.frames], axis=2)
        diff = _run.diff_image(sdpa.frames, sage.frames)
        res.files.update({other.attention: other.path,
                          "side_by_side": _run.write_video(_run.sibling(out_path, "side_by_side"), sbs, fps),
                          "diff": _run.write_video(_run.sibling(out_path, "diff"), diff, fps)})
        report = _run.comparison(sage, sdpa, per_frame=True)
        report.update({"prompt": prompt, "model": label, "num_frames": num_frames, "height": height,
                       "width": width, "steps": steps, "guidance": guidance,
                       "schedule": schedule.to_dict() if schedule is not None else None, "files": res.files})
        _run.attach_report(res, out_path, report)
    return res
