"""ComfyUI-OpenSora: Open-Sora 1.2 / 1.3 / 2.0 video generation as ComfyUI nodes."""

import importlib.util

WEB_DIRECTORY = "./web"

if importlib.util.find_spec("comfy") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported outside ComfyUI (e.g. pytest collecting the repo as a package): the library only
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
