"""The image counterpart of `sage_video.generate`: Flux and SD3 (local diffusers folders) or an embedded tiny
Flux-style pipeline with random weights.

    from comfy_sage.pipelines.sage_image import generate
    r = generate("a lighthouse at dawn", compare=True)
"""
from __future__ import annotations

import os

import numpy as np
import torch

from . import _run

PIPELINES = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}
DEFAULTS = {
    "tiny-flux": dict(height=64, width=64, steps=8, guidance=3.5),
    "flux": dict(height=1024, width=1024, steps=28, guidance=3.5),
    "sd3": dict(height=1024, width=1024, steps=28, guidance=7.0),
}


def load(model, device, dtype):
    """(pipeline, family, label) for model=None (embedded tiny Flux) or a local diffusers folder."""
    from ._tiny import tiny_flux_pipeline

    return _run.load_model(model, device, dtype, PIPELINES, tiny_flux_pipeline, "tiny-flux", "tiny Flux")


def size_multiple(pipe, family):
    s = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    return s * 2 if family in ("flux", "tiny-flux") else s * int(getattr(pipe.transformer.config, "patch_size", 1))


def generate(prompt: str, *, model=None, height: int | None = None, width: int | None = None,
             steps: int | None = None, guidance: float | None = None, seed: int = 0, attention: str = "sage",
             schedule=None, compare: bool = False, output_path: str | None = None, device=None, pv: str = "auto",
             negative_prompt: str | None = None, progress: bool = True, pipeline=None, sparse=None,
             dense_steps: str = "") -> _run.RunResult:
    """Generate an image with 8-bit attention ("sage") or SDPA ("sdpa"). Same arguments and result as
    `sage_video.generate` without frames; output_path defaults to outputs/comfy_sage_image.png; compare=True writes
    `<out>.sdpa`, `<out>.side_by_side`, `<out>.diff` images and `<out>.json` (timings, speed-up, PSNR)."""
    schedule, dev = _run.check_request(prompt, attention, pv, seed, schedule, device, sparse, dense_steps)
    dtype = torch.bfloat16
    pipe, family, label = _run.pick_pipeline(pipeline, PIPELINES, lambda: load(model, dev, dtype))
    height, width, steps, guidance = _run.with_defaults(DEFAULTS[family], height=height, width=width, steps=steps,
                                                        guidance=guidance)
    m = size_multiple(pipe, family)
    for name, v in (("height", height), ("width", width)):
        if v % m:
            raise ValueError(f"{name}={v} does not fit {family}: it must be a multiple of {m}")
    if schedule is not None:
        schedule.check(num_steps=steps)
    out_path = output_path or _run.default_image_path()
    if os.path.splitext(out_path)[1].lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(f"output_path {out_path!r}: use a .png, .jpg or .webp file name")
    call = dict(prompt=prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                output_type="np")
    if negative_prompt is not None:
        call["negative_prompt"] = negative_prompt
    if family == "tiny-flux":
        from ._tiny import TINY_FLUX_TEXT_LEN

        call["max_sequence_length"] = TINY_FLUX_TEXT_LEN

    runs = {}
    for att in (("sdpa", "sage") if compare else (attention,)):
        out, times, total, cnt, reports = _run.run_once(pipe, call, attention=att, pv=pv, schedule=schedule,
                                                         seed=seed, device=dev, progress=progress, label=att)
        runs[att] = _run.RunResult(None, _run.to_uint8(out.images[0]), times, total, cnt, att, pv, seed, str(dev),
                                   str(dtype).split(".")[-1], label, [str(r) for r in reports],
                                   densities=_run.densities(reports))
    res = runs[attention]
    res.path = _run.write_image(out_path, res.frames)
    res.files["image"] = res.path
    if compare:
        other = runs["sdpa" if attention == "sage" else "sage"]
        sage, sdpa = runs["sage"], runs["sdpa"]
        other.path = _run.write_image(_run.sibling(out_path, other.attention), other.frames)
        res.files.update({
            other.attention: other.path,
            "side_by_side": _run.write_image(_run.sibling(out_path, "side_by_side"),
                                             np.concatenate([sdpa.frames, sage.frames], axis=1)),
            "diff": _run.write_image(_run.sibling(out_path, "diff"), _run.diff_image(sdpa.frames, sage.frames))})
        report = _run.comparison(sage, sdpa, per_frame=False)
        report.update({"prompt": prompt, "model": label, "height": height, "width": width, "steps": steps,
                       "guidance": guidance, "schedule": schedule.to_dict() if schedule is not None else None,
                       "files": res.files})
        _run.attach_report(res, out_path, report)
    return res
