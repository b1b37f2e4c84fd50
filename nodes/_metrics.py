"""Image/latent comparison: PSNR, an SSIM-like score, max abs error and a difference heat-map (torch only)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _as_bchw(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = x.detach().float().cpu()
    if channels_last:          # ComfyUI IMAGE: [B, H, W, C]
        return x.permute(0, 3, 1, 2)
    if x.dim() == 5:           # video latent [B, C, T, H, W] -> frames as batch
        b, c, t, h, w = x.shape
        return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    return x


def _match(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"cannot compare shapes {tuple(a.shape)} and {tuple(b.shape)}: sizes differ")
    n = min(a.shape[0], b.shape[0])
    return a[:n], b[:n]


def ssim_like(a: torch.Tensor, b: torch.Tensor, data_range: float) -> float:
    """Mean SSIM over 7x7 uniform windows of each channel (the classic constants K1=0.01, K2=0.03)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    k = min(7, a.shape[-1], a.shape[-2])
    pool = lambda t: F.avg_pool2d(t, k, stride=1)  # noqa: E731
    mu_a, mu_b = pool(a), pool(b)
    var_a = pool(a * a) - mu_a ** 2
    var_b = pool(b * b) - mu_b ** 2
    cov = pool(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def compare(a: torch.Tensor, b: torch.Tensor, *, channels_last: bool = True, data_range: float | None = None) -> dict:
    """Metrics of b against reference a. IMAGE tensors are [B,H,W,C] in [0,1]; latents [B,C,H,W] or 5-D."""
    x, y = _match(_as_bchw(a, channels_last), _as_bchw(b, channels_last))
    if data_range is None:
        data_range = 1.0 if channels_last else max(float(x.max() - x.min()), 1e-6)
    diff = (x - y).abs()
    mse = float((diff ** 2).mean())
    psnr = math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)
    return {"psnr": psnr, "ssim": ssim_like(x, y, data_range), "max_abs": float(diff.max()),
            "mean_abs": float(diff.mean()), "finite": bool(torch.isfinite(y).all()), "diff": diff}


def heatmap(diff: torch.Tensor, scale: float | None = None) -> tuple[torch.Tensor, float]:
    """[B,C,H,W] abs difference -> IMAGE [B,H,W,3]: black (0) -> red -> yellow -> white (>= scale)."""
    d = diff.mean(dim=1)
    if scale is None:
        scale = float(d.max())
    scale = max(scale, 1e-8)
    t = (d / scale).clamp(0, 1)
    r = (t * 3).clamp(0, 1)
    g = (t * 3 - 1).clamp(0, 1)
    bl = (t * 3 - 2).clamp(0, 1)
    return torch.stack([r, g, bl], dim=-1), scale


def format_metrics(m: dict, ratio: float | None, scale: float) -> str:
    psnr = "inf (identical)" if math.isinf(m["psnr"]) else f"{m['psnr']:.2f} dB"
    parts = [f"PSNR {psnr}", f"SSIM {m['ssim']:.4f}", f"max abs {m['max_abs']:.4g}", f"mean abs {m['mean_abs']:.4g}"]
    if not m["finite"]:
        parts.append("NON-FINITE values in the second input")
    parts.append(f"speed-up {ratio:.3f}x" if ratio is not None else "speed-up n/a (connect both models)")
    parts.append(f"heat-map white = {scale:.3g}")
    return ", ".join(parts)
