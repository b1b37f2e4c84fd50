"""comfy_sage: 8-bit SageAttention for ComfyUI and diffusers.

ComfyUI loads this file from custom_nodes/<folder>/; `pip install -e .` makes the same tree importable as
`comfy_sage`. Importing it never imports ComfyUI or compiles a kernel, and imports torch only once the node mappings
are asked for (ComfyUI asks right after loading this file), so that `python -m comfy_sage --help`, which imports
this package first, answers at once.
"""
WEB_DIRECTORY = None
__version__ = "0.1.0"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]


def __getattr__(name):
    if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
        from . import nodes

        return getattr(nodes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
