"""ComfyUI nodes. Listing them never imports ComfyUI: `comfy` is imported only inside code that runs there."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
