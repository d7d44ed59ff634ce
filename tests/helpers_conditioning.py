"""Seeded random CONDITIONING for the Open-Sora Sampler nodes (used by probes that run inside ComfyUI)."""

from __future__ import annotations

import torch


def random_conditioning(version: str, config) -> tuple[list, list]:
    """(positive, negative) shaped as Open-Sora Encode Prompt emits them for `version` ("1.2", "1.3", "2.0",
    "2.0 DC-AE"), with the widths of the DiT `config`: 2.0 = T5 states + CLIP pooled, 1.x = a masked caption and
    the null caption as negative."""
    gen = torch.Generator().manual_seed(7)
    if version.startswith("2.0"):

        def one():
            t5 = torch.randn(1, 7, config.context_in_dim, generator=gen)
            pooled = torch.randn(1, config.vec_in_dim, generator=gen)
            return [[t5, {"pooled_output": pooled, "opensora_version": "2.0"}]]

        return one(), one()
    y = torch.randn(1, config.model_max_length, config.caption_channels, generator=gen)
    mask = torch.zeros(1, config.model_max_length, dtype=torch.long)
    mask[:, :9] = 1
    positive = [[y, {"attention_mask": mask, "opensora_version": version}]]
    return positive, [[torch.zeros(1, 1, 1), {"opensora_null_caption": True, "opensora_version": version}]]


def sampler_node_samples(model, version: str, latent_args: tuple, seed: int, steps: int, cfg: float) -> torch.Tensor:
    """The Open-Sora Sampler node's samples for `model` on random conditioning and Empty Latent Video(*latent_args),
    then every model unloaded (inside a ComfyUI probe: the pack is importable as opensora_pack)."""
    import comfy.model_management
    from opensora_pack.nodes import latent, sampling

    positive, negative = random_conditioning(version, model.model.diffusion_model.config)
    (empty,) = latent.OpenSoraEmptyLatentVideo().generate(*latent_args)
    (out,) = sampling.OpenSoraSampler().sample(model, positive, negative, empty, seed, steps, cfg)
    comfy.model_management.unload_all_models()
    return out["samples"]
