"""`python -m comfy_sage ...` on a CPU-only machine with no environment variable set: every command runs (the
kernels through Triton's interpreter where a command needs them), `--help` exits 0."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only behaviour")


def cli(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "COMFY_SAGE_STRICT")}
    return subprocess.run([sys.executable, "-m", "comfy_sage", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=os.path.dirname(__file__))


def test_help_lists_every_command_and_exits_0():
    from comfy_sage.__main__ import COMMANDS

    for flag in ("--help", "-h"):
        r = cli(flag)
        assert r.returncode == 0, r.stderr
        for name, what in COMMANDS.items():
            assert name in r.stdout and what.split(" (")[0][:40] in r.stdout
    r = cli()
    assert r.returncode == 2 and "usage" in r.stderr
    r = cli("frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr


def test_help_and_argument_errors_answer_at_once():
    """Every command's --help (with its description) and an argument error come from argparse alone: no torch,
    Triton or diffusers import, which took 5-10 s a call here before."""
    import time

    from comfy_sage.__main__ import COMMANDS

    flat = lambda text: " ".join(text.split())  # noqa: E731  (argparse wraps the description)
    for args, rc, wanted in [(("--help",), 0, COMMANDS["image"]), (("frobnicate",), 2, "unknown command"),
                             (("video",), 2, "the following arguments are required: prompt"),
                             (("video", "a fox", "--frames", "x"), 2, "invalid int value: 'x'"),
                             (("attention", "--pv", "fp4"), 2, "invalid choice: 'fp4'")] + [
                            ((name, "--help"), 0, what) for name, what in COMMANDS.items()]:
        start = time.perf_counter()
        r = cli(*args, timeout=60)
        took = time.perf_counter() - start
        assert r.returncode == rc and wanted in flat(r.stdout + r.stderr), (args, r.stdout, r.stderr)
        assert took < 3, (args, took)  # 0.2-0.5 s measured on the 2-core CPU machine
    code = ("import sys\nfrom comfy_sage.__main__ import main\ntry:\n    main(['video', '--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted({'torch', 'triton', 'diffusers'} & set(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.splitlines()[-1] == "[]", r.stdout + r.stderr


def test_attention_runs_the_kernel_through_the_interpreter():
    r = cli("attention", "--n", "40", "--head-dim", "32")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Triton interpreter" in r.stdout and "'int8-fp8pv': 1" in r.stdout
    assert float(r.stdout.split("relative L1 vs fp32 = ")[1].split(";")[0]) < 0.1


def test_doctor_and_bench():
    r = cli("doctor")
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout)
    assert info["gpu"] is None and info["path"] == "sdpa" and info["triton"]
    r = cli("bench", "--cpu-n", "32")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 16 and "speed needs one" in r.stdout  # 4 input kinds x head dims 64/128 x full/causal
    assert all("'sage_fp8': [0.99" in row and "'sage_int8': [0.99" in row for row in rows)
    for command in ("video", "image", "attention", "bench", "doctor"):
        r = cli(command, "--help")
        assert r.returncode == 0 and "usage" in r.stdout, (command, r.stderr[-500:])
