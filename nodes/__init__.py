"""ComfyUI nodes. Listing them never imports ComfyUI: `comfy` is imported only inside code that runs there."""
from . import _runtime
from .sage_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# Inside ComfyUI core's attention module is loaded before custom nodes: offer ours to its registry of named attention
# functions now, so that tools selecting attention by name see it before any Apply SageAttention runs (elsewhere
# this finds no core and does nothing).
_runtime.register_attention()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
