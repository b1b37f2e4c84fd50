"""What the installed Triton offers, for the features that arrived after Triton 3.2 (the oldest release we support).

The kernels themselves use only what 3.2 has; everything newer is asked here, in one place, with the release
that added it. (_attention_ws.py, in Gluon, has its own narrower gate: it imports only where Gluon exists and runs
only on the Triton it was measured with.)
"""
import functools

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
