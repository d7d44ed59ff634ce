"""Timestep schedules of the Open-Sora samplers (1.2 / 1.3 RFlow and 2.0 flow matching).

1.x works on the 0..1000 scale (t = 1000 is pure noise) and returns N values: step i goes from t[i]
to t[i + 1], the last step to 0. 2.0 works on 1..0 and returns N + 1 values ending in 0.
The operation order follows the reference exactly, so float32 results are bit-identical to it.
"""

from __future__ import annotations

import math

import torch

V1_VERSIONS = ("1.2", "1.3")
NUM_TIMESTEPS = 1000
BASE_RESOLUTION = 512 * 512


def _check_version(version: str) -> str:
    version = str(version)
    if version not in V1_VERSIONS:
        raise ValueError(f"unknown Open-Sora 1.x version {version!r}; allowed: {', '.join(V1_VERSIONS)}")
    return version


def _check_size(height: float, width: float, num_frames: float) -> None:
    if not (height > 0 and width > 0):
        raise ValueError(f"height and width must be positive pixel sizes, got {height} x {width}")
    if num_frames < 1 or num_frames != int(num_frames):
        raise ValueError(f"num_frames must be a whole number >= 1, got {num_frames}")


def temporal_factor_v1(num_frames: int, version: str) -> int:
    """T' of the 1.x transform: 1 for images, else n // 17 * 5 (1.2) or (n - 1) // 4 (1.3)."""
    version = _check_version(version)
    if num_frames == 1:
        return 1
    factor = num_frames // 17 * 5 if version == "1.2" else (num_frames - 1) // 4
    if factor == 0:
        # The reference divides by zero here and samples garbage (NaN / zero timesteps).
        smallest = 17 if version == "1.2" else 5
        raise ValueError(
            f"Open-Sora {version} cannot schedule {num_frames} frames: its timestep transform needs "
            f"num_frames == 1 (image) or num_frames >= {smallest}"
        )
    return factor


def timestep_transform_v1(
    t: torch.Tensor,
    height: float,
    width: float,
    num_frames: int,
    version: str,
    bf16_inputs: bool = False,
) -> torch.Tensor:
    """Resolution / length shift of 1.x timesteps; `t` and the result are on the 0..1000 scale.

    `height` / `width` are pixel sizes. `bf16_inputs=True` computes the ratio from bf16 tensors the way
    the official bf16 inference does (quirk Q2: 854 -> 856, ratio rounded to bf16); the rest stays float32.
    """
    _check_size(height, width, num_frames)
    temporal_factor_v1(int(num_frames), version)  # raises for the frame counts the reference breaks on
    dtype = torch.bfloat16 if bf16_inputs else torch.float32
    device = t.device
    # The reference holds these as [batch] tensors; a [1] tensor broadcasts the same way.
    h = torch.tensor([float(height)], dtype=dtype, device=device)
    w = torch.tensor([float(width)], dtype=dtype, device=device)
    frames = torch.tensor([float(num_frames)], dtype=dtype, device=device)

    s = t.float() / NUM_TIMESTEPS
    ratio_space = (h * w / BASE_RESOLUTION).sqrt()
    if int(num_frames) == 1:
        frames_factor = torch.ones_like(frames)
    elif version == "1.2":
        frames_factor = frames // 17 * 5  # floor division on float tensors, as the reference
    else:
        frames_factor = (frames - 1) // 4
    ratio = ratio_space * frames_factor.sqrt()  # transform_scale is 1 in every released config
    # ratio (and ratio - 1) stay in the input dtype; mixing with float32 s promotes to float32.
    shifted = ratio * s / (1 + (ratio - 1) * s)
    return shifted * NUM_TIMESTEPS


def rflow_timesteps(
    num_steps: int,
    height: int,
    width: int,
    num_frames: int,
    version: str,
    use_timestep_transform: bool = True,
    bf16_inputs: bool = False,
    use_discrete_timesteps: bool = False,
) -> torch.Tensor:
    """The N float32 timesteps (0..1000) the 1.x RFlow sampler feeds the model; step i ends at t[i+1] or 0.

    `use_discrete_timesteps` rounds the base values to integers before the transform (off in every config).
    """
    version = _check_version(version)
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a whole number >= 1, got {num_steps}")
    num_steps = int(num_steps)
    _check_size(height, width, num_frames)
    temporal_factor_v1(int(num_frames), version)
    # Python-float base values, then float32, as torch.tensor([t]) does in the reference.
    base_values = [(1.0 - i / num_steps) * NUM_TIMESTEPS for i in range(num_steps)]
    if use_discrete_timesteps:
        base_values = [float(round(value)) for value in base_values]
    base = torch.tensor(base_values, dtype=torch.float32)
    if not use_timestep_transform:
        return base
    return timestep_transform_v1(base, height, width, num_frames, version, bf16_inputs=bf16_inputs)


def v2_shift_alpha(tokens_per_frame: int, latent_frames: int) -> float:
    """2.0 shift: linear in tokens per frame (256 -> 1, 4096 -> 3), times sqrt(latent frames); float64."""
    if tokens_per_frame < 1 or latent_frames < 1:
        raise ValueError(f"tokens_per_frame and latent_frames must be >= 1, got {tokens_per_frame} and {latent_frames}")
    slope = (3 - 1) / (4096 - 256)
    intercept = 1 - slope * 256
    alpha = slope * tokens_per_frame + intercept
    alpha *= math.sqrt(latent_frames)
    return alpha


def v2_timesteps(
    num_steps: int,
    tokens_per_frame: int,
    latent_frames: int,
    shift: bool = True,
    shift_alpha: float | None = None,
) -> torch.Tensor:
    """The N + 1 float32 times (1 .. 0) of the 2.0 sampler; `shift_alpha` (flow_shift) overrides the rule."""
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a whole number >= 1, got {num_steps}")
    t = torch.linspace(1, 0, int(num_steps) + 1)
    if not shift:
        return t
    alpha = v2_shift_alpha(tokens_per_frame, latent_frames) if shift_alpha is None else float(shift_alpha)
    if not alpha > 0:
        raise ValueError(f"shift_alpha must be > 0, got {alpha}")
    return alpha * t / (1 + (alpha - 1) * t)


def oscillation_scale(scale: float, step: int, force_num: int = 10) -> float:
    """Oscillation guidance (1.x and 2.0 get_oscillation_gs): the full scale for the first force_num steps, then
    on even steps only, else 1.0."""
    return scale if step < force_num or step % 2 == 0 else 1.0
