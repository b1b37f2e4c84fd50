"""What `sage_video.generate` and `sage_image.generate` share: argument checks, device/dtype, loading a local
diffusers folder, per-step timing, writing media, and the sage-vs-SDPA comparison report."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..kernels import counters, reset_counters
from ..kernels.schedule import Schedule
from .enable import disable_sage, enable_sage, with_sparse

ATTENTIONS = ("sage", "sdpa")


@dataclass
class RunResult:
    """One generation: where it went, what it made, how long each step took, which attention paths ran."""
    path: str | None
    frames: np.ndarray               # uint8: video [F, H, W, 3], image [H, W, 3]
    step_times: list                 # seconds per denoising step
    total_s: float
    counters: dict                   # kernels.counters() for this run
    attention: str
    pv: str
    seed: int
    device: str
    dtype: str
    model: str
    reports: list = field(default_factory=list)   # enable_sage reports (sage only)
    compare: dict | None = None      # compare=True: the sdpa run, outputs and metrics
    files: dict = field(default_factory=dict)      # every file written, by role
    densities: dict = field(default_factory=dict)  # sparse runs: {"<model>.<site>": mean density of its calls}

    @property
    def median_step_s(self) -> float | None:
        return median_step(self.step_times)

    def summary(self) -> dict:
        return {"path": self.path, "attention": self.attention, "pv": self.pv, "seed": self.seed,
                "device": self.device, "dtype": self.dtype, "model": self.model,
                "shape": list(self.frames.shape), "step_times_s": [round(t, 6) for t in self.step_times],
                "median_step_s": self.median_step_s, "total_s": round(self.total_s, 4),
                "counters": self.counters, **({"sparse_densities": self.densities} if self.densities else {})}


def median_step(times):
    """Median step time, leaving out the first step (kernel compilation and warm-up) when there are others."""
    t = list(times[1:] if len(times) > 1 else times)
    return float(np.median(t)) if t else None


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: use one of {', '.join(map(repr, choices))}")
    return value


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_guidance(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"guidance must be a finite number >= 0, got {value!r}")
    return float(value)


def with_defaults(defaults: dict, **given) -> tuple:
    """The given generation settings in order, each None replaced by the family's default and checked:
    `guidance` a finite number >= 0, every other one a positive integer."""
    out = []
    for name, value in given.items():
        value = defaults[name] if value is None else value
        out.append(check_guidance(value) if name == "guidance" else check_positive_int(name, value))
    return tuple(out)


def as_schedule(schedule):
    if schedule is None or isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, dict):
        return Schedule.from_dict(schedule)
    if isinstance(schedule, str):
        return Schedule.from_json(schedule)
    raise TypeError(f"schedule must be a Schedule, a dict or a JSON string, got {type(schedule).__name__}")


def resolve_device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch has no CUDA device "
                         f"(torch {torch.__version__}); use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use 'cpu' or 'cuda'")
    return dev



def check_request(prompt, attention, pv, seed, schedule, device, sparse=None, dense_steps=""):
    """The checks every generate() makes first; returns (schedule or None, torch.device). `sparse` and
    `dense_steps` (enable_sage's) are folded into the schedule, so that its step check covers them."""
    from .backend import check_pv

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    check_choice("attention", attention, ATTENTIONS)
    check_pv(pv)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    schedule = with_sparse(as_schedule(schedule), sparse, dense_steps)
    if schedule is not None and attention != "sage":
        raise ValueError("a schedule (or sparse attention) only applies to attention='sage'")
    return schedule, resolve_device(device)


def pick_pipeline(pipeline, supported: dict, load):
    """(pipe, family, label) for a given pipeline object of a supported class, else from `load()`."""
    if pipeline is None:
        return load()
    family = getattr(pipeline, "_comfy_sage_family", None) or supported.get(type(pipeline).__name__)
    if family is None:
        raise ValueError(f"pipeline {type(pipeline).__name__} is not supported here; supported: "
                         f"{', '.join(sorted(supported))}")
    return pipeline, family, type(pipeline).__name__


def load_model(model, device, dtype, supported: dict, tiny, tiny_family: str, tiny_name: str):
    """(pipeline, family, label): the embedded tiny pipeline `tiny(dtype=...)` for model=None, else a local
    diffusers folder of one of the `supported` classes."""
    if model is None:
        return tiny(dtype=dtype).to(device), tiny_family, f"embedded {tiny_name} (random weights)"
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be None (embedded {tiny_name}) or a path to a diffusers folder, got "
                        f"{type(model).__name__}")
    pipe, family = load_local_pipeline(model, supported, dtype)
    return pipe.to(device), family, str(model)

def load_local_pipeline(path, allowed: dict, dtype):
    """Load a diffusers folder from disk only (local_files_only, safetensors). allowed: {pipeline class name:
    family}. Errors name what is missing or wrong."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise FileNotFoundError(f"model folder {str(p)!r} does not exist")
    if not p.is_dir():
        raise ValueError(f"model {str(p)!r} is a file; give a diffusers folder (with model_index.json)")
    index = p / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{str(p)!r} is not a diffusers pipeline folder: model_index.json is missing")
    try:
        meta = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{index} is not valid JSON: {e}") from e
    cls_name = meta.get("_class_name") if isinstance(meta, dict) else None
    if cls_name not in allowed:
        raise ValueError(f"{index}: pipeline class {cls_name!r} is not supported here; supported: "
                         f"{', '.join(sorted(allowed))}")
    missing = []
    for comp, spec in meta.items():
        if comp.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        if comp in ("scheduler", "tokenizer", "tokenizer_2", "tokenizer_3", "feature_extractor",
                    "image_processor"):
            if not (p / comp).is_dir():
                missing.append(f"{comp}/")
            continue
        d = p / comp
        if not (d / "config.json").is_file():
            missing.append(f"{comp}/config.json")
        elif not any(d.glob("*.safetensors")):
            missing.append(f"{comp}/*.safetensors")
    if missing:
        raise FileNotFoundError(f"{str(p)!r} ({cls_name}) is incomplete: missing {', '.join(missing)}")
    import diffusers

    cls = getattr(diffusers, cls_name)
    pipe = cls.from_pretrained(str(p), local_files_only=True, use_safetensors=True, torch_dtype=dtype)
    return pipe, allowed[cls_name]


class StepTimer:
    """Per-step wall times through `callback_on_step_end`; step 0 starts at the first denoiser forward."""

    def __init__(self, models, device):
        self.device = device
        self.times = []
        self.t0 = None
        self.hooks = [m.register_forward_pre_hook(self._pre) for m in models]

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pre(self, module, args):
        if self.t0 is None:
            self._sync()
            self.t0 = time.perf_counter()

    def callback(self, pipe, step, timestep, callback_kwargs):
        self._sync()
        now = time.perf_counter()
        self.times.append(now - self.t0)
        self.t0 = now
        return {}

    def close(self):
        for h in self.hooks:
            h.remove()


def denoisers(pipe):
    from diffusers.models.modeling_utils import ModelMixin

    return [c for n, c in pipe.components.items()
            if isinstance(c, ModelMixin) and n.startswith(("transformer", "unet"))]


def densities(reports) -> dict:
    """{"<model>.<site>": mean density} of the sites that ran sparse, over enable_sage's reports."""
    return {f"{r.model}.{site}": d for r in reports for site, d in r.densities().items()}


def run_once(pipe, call_kwargs, *, attention, pv, schedule, seed, device, progress, label):
    """One pipeline call with the given attention; returns (output, step_times, total_s, counters, reports)."""
    reports = []
    if attention == "sage":
        reports = enable_sage(pipe, schedule=schedule, pv=pv)
    else:
        disable_sage(pipe)
    pipe.set_progress_bar_config(disable=not progress, desc=label, leave=True)
    timer = StepTimer(denoisers(pipe), device)
    reset_counters()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    t0 = time.perf_counter()
    try:
        out = pipe(generator=gen, callback_on_step_end=timer.callback, **call_kwargs)
    finally:
        timer.close()
        if attention == "sage":
            disable_sage(pipe)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, timer.times, time.perf_counter() - t0, counters(), reports


def to_uint8(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB of two uint8 images; None when identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def diff_image(a, b, gain=4):
    """|a - b| amplified `gain` times (so small 8-bit differences are visible)."""
    return np.clip(np.abs(a.astype(np.int16) - b.astype(np.int16)) * gain, 0, 255).astype(np.uint8)


def write_video(path, frames: np.ndarray, fps: int) -> str:
    """frames: uint8 [F, H, W, 3]. .mp4 through imageio-ffmpeg (H.264), .gif through pillow."""
    path = str(path)
    ext = os.path.splitext(path)[1].lower()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if ext == ".mp4":
        try:
            import imageio_ffmpeg
        except ImportError as e:
            raise RuntimeError("writing .mp4 needs the imageio-ffmpeg package (pip install imageio-ffmpeg), or "
                               "give an output path ending in .gif") from e
        h, w = frames.shape[1:3]
        writer = imageio_ffmpeg.write_frames(path, (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                             macro_block_size=2, quality=8, ffmpeg_log_level="error")
        writer.send(None)
        for f in frames:
            writer.send(np.ascontiguousarray(f))
        writer.close()
    elif ext == ".gif":
        from PIL import Image

        imgs = [Image.fromarray(f) for f in frames]
        imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=max(1, round(1000 / fps)), loop=0)
    else:
        raise ValueError(f"output {path!r}: use a .mp4 or .gif file name")
    return path


def write_image(path, image: np.ndarray) -> str:
    from PIL import Image

    path = str(path)
    if os.path.splitext(path)[1].lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(f"output {path!r}: use a .png, .jpg or .webp file name")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


# Where outputs go when no path is given: a folder of their own (ignored by the repository's .gitignore), not the
# working directory, which a demo run from a checkout would litter with untracked files.
OUTPUT_DIR = "outputs"


def default_video_path():
    try:
        import imageio_ffmpeg  # noqa: F401

        return os.path.join(OUTPUT_DIR, "comfy_sage_video.mp4")
    except ImportError:
        return os.path.join(OUTPUT_DIR, "comfy_sage_video.gif")


def default_image_path():
    return os.path.join(OUTPUT_DIR, "comfy_sage_image.png")


def sibling(path, tag):
    """'out/v.mp4', 'sdpa' -> 'out/v.sdpa.mp4'."""
    root, ext = os.path.splitext(str(path))
    return f"{root}.{tag}{ext}"


def attach_report(res, out_path: str, report: dict) -> None:
    """Write a compare run's report as `<out>.json` beside the output and attach it to the result."""
    json_path = os.path.splitext(out_path)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    res.files["json"] = json_path
    res.compare = report


def comparison(sage: RunResult, sdpa: RunResult, per_frame: bool) -> dict:
    a, b = sdpa.frames, sage.frames
    frames_a = a if per_frame else a[None]
    frames_b = b if per_frame else b[None]
    ps = [psnr(x, y) for x, y in zip(frames_a, frames_b)]
    finite = [p for p in ps if p is not None]
    sage_med, sdpa_med = sage.median_step_s, sdpa.median_step_s
    ran_8bit = sum(v for k, v in sage.counters.items() if k.startswith("int8-"))
    if ran_8bit and not sage.device.startswith("cpu"):
        speed = {"speedup_per_step": (sdpa_med / sage_med) if sage_med and sdpa_med else None,
                 "median_step_s": {"sage": sage_med, "sdpa": sdpa_med},
                 "total_s": {"sage": sage.total_s, "sdpa": sdpa.total_s}}
    else:
        # Both runs took exact SDPA, so their step times time one computation twice (on a busy CPU they still differ
        # by 2x and more), or the 8-bit kernel ran through Triton's interpreter, which emulates it: no speed-up
        # figure to misread. Each run's own times stay in its summary below.
        why = ("the 8-bit kernel ran through Triton's interpreter on the CPU, which emulates it" if ran_8bit else
               f"both runs took exact SDPA (sage run's paths: {', '.join(sorted(sage.counters)) or 'none'}); "
               f"the 8-bit kernel needs a CUDA GPU")
        speed = {"speedup_per_step": None, "speed": f"not measured: {why}"}
    return {
        **speed,
        "sage_8bit_calls": ran_8bit,
        "sage_fallback_calls": sum(v for k, v in sage.counters.items() if not k.startswith("int8-")),
        "psnr_db_per_frame": ps,
        "psnr_db_mean": (sum(finite) / len(finite)) if finite else None,
        "psnr_note": "null = identical frames; PSNR of sage against sdpa on 8-bit RGB",
        "max_abs_diff": int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()),
        "sage": sage.summary(),
        "sdpa": sdpa.summary(),
    }
