"""diffusers' Wan self-attention with its rotary embedding in one Triton pass (kernels/_rope.py) instead of
diffusers' strided torch ops, which cost ~12 ms of a Wan-14B layer at 720p on the H200 (bench/NOTES.md).

diffusers' WanAttnProcessor rotates q and k right after `attn.norm_q` / `attn.norm_k` when it is given
`rotary_emb`. For a module whose processor is one of those classes, a pre-hook takes the tables out of the call
(the processor then skips its own rotation) and forward hooks on the two norms rotate their outputs. The same
values reach attention (but for one unit in the last place in ~2e-5 of the bf16 elements) and every path after
the rotation (8-bit, exact fallbacks, calibration, context parallel) is unchanged. Where the Triton pass cannot
run (a CPU without the interpreter), or for fp32 calls, the hooks leave the call alone.
"""
from __future__ import annotations

import functools
import importlib

import torch

from ..kernels._rope import can_rotate, pair_tables, rotate_pairs

# modules holding a WanAttnProcessor that rotates as above (transformer_wan_animate carries its own copy)
_PROCESSOR_MODULES = ("diffusers.models.transformers.transformer_wan",
                      "diffusers.models.transformers.transformer_wan_animate")
_ROTARY_ARG = 3  # WanAttention.forward(hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


@functools.cache
def _processor_classes() -> tuple:
    out = []
    for name in _PROCESSOR_MODULES:
        try:
            out.append(importlib.import_module(name).WanAttnProcessor)
        except (ImportError, AttributeError):
            pass
    return tuple(out)


def applies(module) -> bool:
    """A Wan attention module whose processor rotates q and k after its norms."""
    return (type(getattr(module, "processor", None)) in _processor_classes() and hasattr(module, "norm_q")
            and hasattr(module, "norm_k") and hasattr(module, "heads"))


class FusedRope:
    """The hooks on one Wan attention module; `remove()` puts the module back as it was."""

    def __init__(self, module):
        self.module = module
        self.classes = _processor_classes()  # looked up once: torch.compile traces the hooks
        self.tables = None  # the call in progress: diffusers' (cos, sin) and their pair_tables()
        self.handles = [module.register_forward_pre_hook(self._take, with_kwargs=True),
                        module.norm_q.register_forward_hook(self._rotate),
                        module.norm_k.register_forward_hook(self._rotate),
                        module.register_forward_hook(self._drop)]

    def _take(self, module, args, kwargs):
        self.tables = None
        positional = len(args) > _ROTARY_ARG
        rot = args[_ROTARY_ARG] if positional else kwargs.get("rotary_emb")
        x = args[0] if args else kwargs.get("hidden_states")
        cross = (len(args) > 1 and args[1] is not None) or kwargs.get("encoder_hidden_states") is not None
        if (rot is None or cross or type(module.processor) not in self.classes or not isinstance(x, torch.Tensor)
                or not can_rotate(x)):
            return None  # nothing to rotate, or a call this module's processor handles itself
        self.tables = (*rot, pair_tables(*rot))  # once for q and k
        if positional:
            return args[:_ROTARY_ARG] + (None,) + args[_ROTARY_ARG + 1:], kwargs
        return args, {**kwargs, "rotary_emb": None}

    def _rotate(self, norm, args, out):
        if self.tables is None:
            return None
        cos, sin, pairs = self.tables
        return rotate_pairs(out.unflatten(2, (self.module.heads, -1)), cos, sin, tables=pairs).flatten(2)

    def _drop(self, module, args, out):
        self.tables = None

    def remove(self):
        for h in self.handles:
            h.remove()
        self.tables = None
