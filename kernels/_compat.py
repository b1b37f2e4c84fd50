"""What the installed Triton offers, for the features that arrived after Triton 3.2 (the oldest release we support).

The kernels themselves use only what 3.2 has; everything newer is asked here, in one place, with the release
that added it. (_attention_ws.py, in Gluon, has its own narrower gate: it imports only where Gluon exists and runs
only on the Triton it was measured with.)
"""
import functools
import os
import re
import subprocess

TESTED_TRITON = ((3, 2), (3, 9))  # the oldest and newest release CI runs the kernels on (.ci/run)


@functools.cache
def has_tensor_descriptors() -> bool:
    """Host-side tensor descriptors (`triton.tools.tensor_descriptor.TensorDescriptor`, kernel arguments whose
    `.load` is a bulk copy, TMA, on sm90): Triton 3.4. Before that, the sm90 tiles take the pointer path."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


def launch_options(maxnreg=None) -> dict:
    """Compile options every launch of ours passes, meaning the same on each Triton:
    - enable_fp_fusion=True (a·b + c as one FMA: the softmax's instruction counts in bench/NOTES.md and the rope
      kernel's rounding assume it). Triton 3.9 warns that its default turns fusion off in 3.10; stating it keeps
      today's code and silences the warning. Accepted by every Triton since 3.2 (and ignored by the interpreter).
    - maxnreg (a register cap per thread, every Triton since 3.2), only when set."""
    return {"enable_fp_fusion": True, **({"maxnreg": maxnreg} if maxnreg else {})}


def ptxas_path(arch: int) -> str:
    """The ptxas Triton runs for compute capability `arch` (90 for sm90): Triton 3.5+ asks `get_ptxas(arch)`, and
    from 3.9 compiles sm90 and newer with a second, newer bundled ptxas (`ptxas-blackwell`, CUDA 13.4 against 12.9
    below sm90); earlier Tritons have one (TRITON_PTXAS_PATH where set)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, TypeError, AttributeError):  # Triton 3.2-3.4: one ptxas, no arch argument
        import triton

        return os.environ.get("TRITON_PTXAS_PATH") or os.path.join(os.path.dirname(triton.__file__), "backends",
                                                                   "nvidia", "bin", "ptxas")


def ptxas_release(arch: int) -> str | None:
    """'<CUDA release> (<path>)' of that ptxas, or None where it cannot be run: the SASS of the same Triton differs
    between ptxas releases, so timings and bug reports name it (`doctor`, the bench's environment)."""
    try:
        path = ptxas_path(arch)
        text = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except Exception:  # noqa: BLE001 - a diagnostic: never a reason to fail
        return None
    m = re.search(r"release (\d+\.\d+)", text)
    return f"{m.group(1)} ({path})" if m else None
