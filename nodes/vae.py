"""The 1.x VAEs and the 2.0 Video DC-AE under ComfyUI's memory manager (core's VAE class cannot build them).

OPENSORA_VAE.encode returns the latent the DiT works on and decode takes it back. For the DC-AE that space
depends on the scaling chosen on Load Open-Sora VAE: z / 0.493 (the scaling the DC-AE DiT was trained with,
configs/diffusion/train/high_compression.py) or z itself (the official inference config sets none, Q12). The
DC-AE encode / decode always use the official tiles of high_compression.py (256 px, 32 frames, overlap 0.25).

Before each encode / decode, ComfyUI is told the activation memory it needs (encode_memory / decode_memory), as
core's VAE does with memory_used_encode / memory_used_decode, so partial loading leaves that much VRAM free.
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import torch

from ..opensora_lib.configs import read_config_json
from ..opensora_lib.dcae import DCAE, DCAEConfig
from ..opensora_lib.memory import FLOAT32, decode_memory, decoded_elements, encode_memory
from ..opensora_lib.vae_v12 import OpenSoraVAEv12, VAEv12Config
from ..opensora_lib.vae_v13 import OpenSoraVAEv13, VAEv13Config
from .common import SMALLER_VIDEO, check_host_memory, wrap_module

BUILDERS = {"vae_v12": ("1.2", VAEv12Config, OpenSoraVAEv12), "vae_v13": ("1.3", VAEv13Config, OpenSoraVAEv13)}
# Load Open-Sora VAE's DC-AE scaling choices -> DCAE scaling_factor (encode divides by it, decode multiplies).
DC_AE_SCALINGS = {"trained 0.493": 0.493, "none (official inference)": None}


@dataclass
class OpenSoraVAE:
    """What flows along an OPENSORA_VAE link."""

    version: str
    model: torch.nn.Module
    patcher: comfy.model_patcher.ModelPatcher
    dtype: torch.dtype
    autoencoder: str | None = None  # "dc_ae" for the 2.0 Video DC-AE, None for the 1.x VAEs

    def _ready(
        self, memory_required: int, what: str, advice: str = SMALLER_VIDEO, host_bytes: int = 0
    ) -> tuple[torch.nn.Module, torch.device]:
        """Load through the memory manager, keeping memory_required bytes free for the activations (core's VAE
        passes its estimate the same way; it is also the minimum, as the work cannot be split further here), once
        check_host_memory has found room in RAM for host_bytes (and the activations, on the CPU)."""
        check_host_memory(host_bytes, what, advice, self.patcher.load_device, memory_required)
        comfy.model_management.load_models_gpu([self.patcher], memory_required=memory_required)
        return self.model, self.patcher.load_device

    def encode(self, pixels: torch.Tensor, noise=None) -> torch.Tensor:
        """[B,3,T,H,W] in [-1,1] -> normalised latent (float32, intermediate device). The 1.x posterior is sampled
        (with `noise`), as the official code does; the DC-AE encoder is deterministic."""
        model, device = self._ready(encode_memory(self.model, pixels.shape, self.dtype), "Encoding the reference")
        if self.autoencoder == "dc_ae":
            z = model.encode(pixels.to(device, self.dtype))
        else:
            z = model.encode(pixels.to(device, self.dtype), sample_posterior=True, noise=noise)
        return z.float().to(comfy.model_management.intermediate_device())

    def decode(
        self, latent: torch.Tensor, num_frames: int | None, tile_size: int = 0, tile_overlap: int = 0
    ) -> torch.Tensor:
        """Normalised latent -> [B,3,T,H,W] in [-1,1]. tile_size / tile_overlap are pixels (0: untiled, exact); the
        DC-AE always decodes with its official tiles and ignores them."""
        frames_bytes = 2 * FLOAT32 * decoded_elements(self.model, latent.shape, num_frames)  # frames, then IMAGE
        model, device = self._ready(
            decode_memory(self.model, latent.shape, self.dtype, tile_size, num_frames),
            f"Decoding a latent of {' x '.join(str(d) for d in latent.shape)}",
            f"The decoded frames alone take {frames_bytes / 2**30:.3g} GiB; tile_size on Open-Sora Decode (1.x VAEs) "
            "lowers only the rest. " + SMALLER_VIDEO,
            frames_bytes,
        )
        z = latent.to(device, self.dtype)
        if self.autoencoder == "dc_ae":
            frames = model.decode(z)  # 4 frames per latent frame (1 for a one-frame latent); callers cut
        else:  # num_frames None (a latent without Open-Sora info): the longest video of that latent
            tiles = (
                {"spatial_tile_size": tile_size // 8, "spatial_tile_overlap": tile_overlap // 8} if tile_size else {}
            )
            frames = model.decode(z, num_frames, **tiles)
        return frames.float().to(comfy.model_management.intermediate_device())


def build_vae(info, sd: dict, dtype: torch.dtype, path: str) -> OpenSoraVAE:
    version, config_class, model_class = BUILDERS[info.family]
    config = config_class.from_dict({**(info.config or {}), **(read_config_json(path) or {})})
    model = model_class(config, dtype=dtype, device="cpu", operations=comfy.ops.disable_weight_init)
    return _loaded(model, sd, f"the Open-Sora {version} VAE", version, dtype)


def build_dcae(info, sd: dict, dtype: torch.dtype, scaling_factor: float | None) -> OpenSoraVAE:
    """The Video DC-AE from a detected "dc_ae" state dict: config from the shapes (family_configs, with the official
    tiling of high_compression.py), the chosen scaling, weights loaded strictly."""
    config = DCAEConfig.from_dict({**info.config, "scaling_factor": scaling_factor})
    model = DCAE(config, dtype=dtype, device="cpu", operations=comfy.ops.disable_weight_init)
    return _loaded(model, sd, "the Video DC-AE", "2.0", dtype, autoencoder="dc_ae")


def _loaded(model, sd: dict, what: str, version: str, dtype: torch.dtype, **kwargs) -> OpenSoraVAE:
    """Load the weights strictly (worded as the DiT loader) and put the VAE under the memory manager."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"The checkpoint does not match {what}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.to(dtype).eval()
    return OpenSoraVAE(version, model, wrap_module(model, "vae"), dtype, **kwargs)
