"""bench/cp_video.py (the multi-GPU context-parallel run) as launched on GPUs, but on 2 CPU processes (torchrun,
gloo) at the tiny Wan shape: every configuration runs, the JSON holds what the GPU run reports, and the
context-parallel outputs equal the single-process ones."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[1]
RUNS = ["single_sdpa", "single_comfy_sage", "ulysses_sdpa", "ulysses_comfy_sage", "ring_sdpa", "ring_comfy_sage"]
STEPS, WARMUP = 1, 0  # CPU: nothing to warm up
FORWARDS = 2 * (STEPS + WARMUP)  # cond + uncond per step
BLOCKS = 2                       # TINY_WAN
WORLD = 2


def _run(tmp_path, *extra, as_module=True, interpret=False):
    # the subprocesses import this checkout as `comfy_sage`, whatever is installed
    pkg = tmp_path / "pkg"
    pkg.mkdir(exist_ok=True)
    if not (pkg / "comfy_sage").exists():
        (pkg / "comfy_sage").symlink_to(REPO, target_is_directory=True)
    out = tmp_path / "cp_video.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pkg), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1" if interpret else "0"}
    env.pop("NCCL_NVLS_ENABLE", None)  # the script must set it
    target = ["-m", "comfy_sage.bench.cp_video"] if as_module else [str(REPO / "bench" / "cp_video.py")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", *target,
           str(out), "--tiny", "--steps", str(STEPS), "--warmup", str(WARMUP), *extra]
    p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "ulysses_comfy_sage" in p.stdout and "wrote" in p.stdout, p.stdout[-2000:]  # rank 0's summary table
    return json.loads(out.read_text())


def _check_common(res):
    assert list(res["runs"]) == RUNS, list(res["runs"])
    env = res["env"]
    assert env["processes"] == WORLD and env["dist_backend"] == "gloo" and env["NCCL_NVLS_ENABLE"] == "0"
    assert env["gpu"] == "cpu" and env["torch"] and env["diffusers"] and env["date"]
    assert res["tokens"] == 32 and res["latent"] == [1, 4, 2, 8, 8] and res["steps_timed"] == STEPS
    runs = res["runs"]
    for name in RUNS:
        r = runs[name]
        assert len(r["step_times_s_per_rank"]) == WORLD and all(len(t) == STEPS for t in r["step_times_s_per_rank"])
        assert r["median_step_s"] == max(r["median_step_s_per_rank"]) > 0
        assert len(r["counters_per_rank"]) == WORLD
        if r["attention"] == "sdpa":  # SDPA runs never touch comfy_sage
            assert r["counters_per_rank"] == [{}] * WORLD, (name, r["counters_per_rank"])
        if r["mode"] != "single":
            assert r["scaling_efficiency"] == pytest.approx(
                runs[f"single_{r['attention']}"]["median_step_s"] / (WORLD * r["median_step_s"]))
            assert r["pass"] is (r["rel_l1_vs_single"] <= res["tolerance"]["rel_l1"])
        if name.endswith("comfy_sage"):
            assert r["speedup_vs_sdpa"] == pytest.approx(
                runs[name.replace("comfy_sage", "sdpa")]["median_step_s"] / r["median_step_s"])
    assert runs["ulysses_sdpa"]["backend"] == "native"
    assert runs["ring_sdpa"]["backend"] == "comfy_sage_exact"  # native SDPA returns no LSE; CPU has no flash
    assert res["all_pass"] is True and res["all_pass_kernel_error"] is True, {
        n: (r.get("rel_l1_vs_single"), r.get("pass"), r.get("kernel_error_ratio")) for n, r in runs.items()}
    return runs


def test_cp_video_fp32_exact_fallback(tmp_path):
    """fp32 on CPU: comfy_sage takes the exact fallback on every rank, so CP must equal single to rounding."""
    res = _run(tmp_path)
    runs = _check_common(res)
    assert res["tolerance"]["measured_rel_l1"] < 1e-6  # the fallback is exact SDPA
    for name in RUNS[2:]:
        r = runs[name]
        assert r["rel_l1_vs_single"] < 1e-5 and r["cos_vs_single"] > 1 - 1e-6, (name, r["rel_l1_vs_single"])
        assert r["pass"] is True
    per_fwd_sites = 2 * BLOCKS  # self + cross attention per block
    for name in ("single_comfy_sage", "ulysses_comfy_sage"):
        assert runs[name]["counters_per_rank"] == [{"sdpa:fp32": FORWARDS * per_fwd_sites}] * WORLD
    # ring: self-attention returns the LSE (one call per ring step); cross-attention keys are not split
    assert runs["ring_comfy_sage"]["counters_per_rank"] == [
        {"sdpa-lse:fp32": FORWARDS * BLOCKS * WORLD, "sdpa:fp32": FORWARDS * BLOCKS}] * WORLD


def test_cp_video_bf16_runs_8bit_kernel_under_cp(tmp_path):
    """bf16 with TRITON_INTERPRET=1: the real 8-bit Triton kernel runs on every rank (ring: with its LSE), the
    tolerance is the kernel's actual error, and CP stays within it. Launched by file path, not -m."""
    res = _run(tmp_path, "--dtype", "bf16", as_module=False, interpret=True)
    runs = _check_common(res)
    tol = res["tolerance"]["rel_l1"]
    assert 1e-3 < res["tolerance"]["measured_rel_l1"] == tol < 0.05
    path = "int8-fp8pv"  # the interpreter's arch entry: FP8 P·V
    for name in ("single_comfy_sage", "ulysses_comfy_sage"):
        assert runs[name]["counters_per_rank"] == [{path: FORWARDS * 2 * BLOCKS}] * WORLD
    assert runs["ring_comfy_sage"]["counters_per_rank"] == [{path: FORWARDS * BLOCKS * (WORLD + 1)}] * WORLD
    for name in ("ulysses_comfy_sage", "ring_comfy_sage"):
        r = runs[name]
        assert r["pass"] is True and r["pass_kernel_error"] is True, (name, r["rel_l1_vs_single"], tol)
        assert 0.5 < r["kernel_error_ratio"] <= 1.1  # the kernel's error under CP is its error on one process
        assert r["cos_vs_single"] > 0.9999
