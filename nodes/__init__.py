"""Thin ComfyUI adapters over opensora_lib: types, validation, memory manager, progress, previews."""

from . import guider, latent, loaders, sampling, text, web_routes  # noqa: F401 (web_routes registers on import)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in (loaders, text, latent, sampling, guider):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
