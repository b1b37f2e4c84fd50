"""TRITON_INTERPRET=1 support: two bugs of the Triton 3.x interpreter (numpy) that the GPU does not have.

- `tl.dot` multiplies bfloat16 operands as the raw uint16 bit patterns they are stored in: we widen them to
  float32 first (exact), which is what the GPU's bf16 MMA computes.
- Rounding to float8 e4m3 drops the carry when the mantissa rounds up (127.97 becomes 64, not 128), rounds ties
  away from zero and truncates subnormals: we convert through torch's float8_e4m3fn instead, which rounds to
  nearest-even and saturates like the GPU's `cvt.rn.satfinite`.
- float32 to bfloat16 truncates (the GPU rounds to nearest-even): converted through torch as well.
Applied once, only when interpreting.
"""
import functools


@functools.cache
def patch_interpreter() -> None:
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    create_dot, create_fp_to_fp, create_fp_trunc = builder.create_dot, builder.create_fp_to_fp, builder.create_fp_trunc

    def dot(self, a, b, d, *args, **kwargs):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return create_dot(self, a, b, d, *args, **kwargs)

    def fp_to_fp(self, src, dst_type, rounding_mode):
        if dst_type.scalar != tl.float8e4nv:
            return create_fp_to_fp(self, src, dst_type, rounding_mode)
        if src.dtype.scalar == tl.bfloat16:
            src = self.cast_impl(src, tl.float32)
        x = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
        x8 = x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return interpreter.TensorHandle(x8, dst_type.scalar)

    def fp_trunc(self, src, dst_type):
        if dst_type.scalar != tl.bfloat16 or src.dtype.scalar != tl.float32:
            return create_fp_trunc(self, src, dst_type)
        x = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
        return interpreter.TensorHandle(x.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)

    builder.create_dot = dot
    builder.create_fp_trunc = fp_trunc
    builder.create_fp_to_fp = fp_to_fp
