"""comfy_sage: 8-bit SageAttention for ComfyUI and diffusers.

ComfyUI loads this file from custom_nodes/<folder>/; `pip install -e .` makes the same tree importable as
`comfy_sage`. Importing it never imports ComfyUI or compiles a kernel.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None
__version__ = "0.1.0"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
