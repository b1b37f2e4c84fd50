"""TRITON_INTERPRET=1 support: the Triton 3.x interpreter multiplies bfloat16 operands of `tl.dot` as the raw
uint16 bit patterns it stores them in. We widen them to float32 first (exact), which is what the GPU's bf16 MMA
computes. Applied once, only when interpreting."""
import functools


@functools.cache
def patch_bf16_dot() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def create_dot(self, a, b, d, *args, **kwargs):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return original(self, a, b, d, *args, **kwargs)

    builder.create_dot = create_dot
