"""Our torch custom ops (`comfy_sage::<name>`), registered once per process: a second import of the pack (ComfyUI
can load a node pack twice under different module names) reuses the registered op instead of failing."""
import torch


def custom_op(name, impl, fake, autograd=None):
    """`torch.ops.comfy_sage.<name>`, registered from `impl` with its fake (shape) function and, given as
    (backward, setup_context), its autograd formula."""
    try:
        return getattr(torch.ops.comfy_sage, name)
    except (AttributeError, RuntimeError):
        pass
    op = torch.library.custom_op(f"comfy_sage::{name}", impl, mutates_args=())
    op.register_fake(fake)
    if autograd is not None:
        op.register_autograd(autograd[0], setup_context=autograd[1])
    return op
