"""Thin ComfyUI adapters over opensora_lib: types, validation, memory manager, progress, previews."""

from . import guider, hunyuan_vae, latent, loaders, prompt_embeds, sampling, text, web_routes  # noqa: F401 (web_routes registers on import)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in (loaders, text, prompt_embeds, latent, sampling, guider, hunyuan_vae):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
