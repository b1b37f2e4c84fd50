"""The offline arch check (bench/arch_check.py) on CPU: the kernels compiled for every arch of the table with
Triton's bundled ptxas, shared memory within each arch's per-block opt-in limit and registers within 255.

By default the check's `quick` subset (every table key once, as causal attention, and the quantization kernel at
head dim 256; 65 compiles, about 220 CPU-seconds with Triton 3.9, two minutes on two free cores): the whole table
is 156 compiles and about 430 CPU-seconds. Set COMFY_SAGE_ARCH_CHECK=full for every config. Runs in a subprocess:
tests/conftest.py sets TRITON_INTERPRET=1, under which Triton's decorators make interpreter functions that do not
compile."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import arch_check  # noqa: E402

FULL = os.environ.get("COMFY_SAGE_ARCH_CHECK") == "full"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    why = arch_check.toolchain_missing()
    if why:
        pytest.skip(f"cannot compile for NVIDIA GPUs here: {why}")
    out = tmp_path_factory.mktemp("arch") / "arch-check.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.join(ROOT, "bench", "arch_check.py"), "--out", str(out)]
    proc = subprocess.run(cmd + ([] if FULL else ["--quick"]), env=env, capture_output=True, text=True,
                          timeout=3600)
    if not out.exists():
        pytest.fail(f"arch check wrote no report (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text()), proc


def test_limits(report):
    rep, proc = report
    assert not rep["problems"], "\n".join(rep["problems"])
    assert proc.returncode == 0, proc.stdout[-4000:]
    for r in rep["configs"]:
        assert r["shared"] <= arch_check.SHARED_LIMIT[r["arch"]] and r["regs"] <= 255, r


def test_every_table_key_compiled(report):
    rep, _ = report
    table = arch_check._sass().kernel_module("_arch").ARCHES
    want = {(a, d, pv) for a in arch_check.ARCHS for d in arch_check.DIMS
            for pv in ("fp16", "fine") + (("fp8",) if table[a].fp8 else ())}
    got = {(r["arch"], r["head_dim"], r["pv"]) for r in rep["configs"] if r["kernel"] == "attn"}
    assert got == want


def test_no_spill_hd256_fp8_on_mma_sync_fp8_arches(report):
    """sm89/sm120 at head dim 256 with FP8 P·V spilled 240-1432 B with 64-key blocks; the table takes 32."""
    rep, _ = report
    rows = [r for r in rep["configs"] if r["kernel"] == "attn" and r["arch"] in ("sm89", "sm120")
            and r["head_dim"] == 256 and r["pv"] == "fp8"]
    assert rows and all(r["stack"] == 0 for r in rows), [(arch_check.label(r), r["stack"]) for r in rows]
