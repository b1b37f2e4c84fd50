"""ComfyUI nodes. Listing them never imports ComfyUI: `comfy` is imported only inside code that runs there."""
from .sage_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
