"""What the installed Triton offers, for the features that arrived after Triton 3.2 (the oldest release we support).

The kernels themselves use only what 3.2 has; everything newer is asked here, in one place, with the release
that added it. (_attention_ws.py, in Gluon, has its own narrower gate: it imports only where Gluon exists and runs
only on the Triton it was measured with.)
"""
import functools


@functools.cache
def has_tensor_descriptors() -> bool:
    """Host-side tensor descriptors (`triton.tools.tensor_descriptor.TensorDescriptor`, kernel arguments whose
    `.load` is a bulk copy, TMA, on sm90): Triton 3.4. Before that, the sm90 tiles take the pointer path."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True
