"""Open-Sora 1.2 / 1.3 RFlow sampler (rectified flow, Euler, v = x0 - eps, t from 1000 to 0).

One plain function, `sample_rflow`, covers every path of the official `RFLOW.sample` (v1.2.0 and v1.3):
text CFG with the learned null caption or a 1.3 negative prompt, oscillation guidance, the guidance
"flaw fix", 1.2 mask-strategy conditioning (per-frame edit ratios, x_mask) and 1.3 reference
conditioning (mask_index, three-pass text + image guidance, per-frame image-weight ramp, SDEdit).

Passes whose guidance weight is exactly 1.0 are not run: the guidance is written as
v = v_c + (g - 1)(v_c - v_u), which is the reference's v_u + g(v_c - v_u) reordered, so at g == 1 the
skipped term is an exact zero and the result is bit-identical to running the pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .schedules import NUM_TIMESTEPS, V1_VERSIONS, oscillation_scale, rflow_timesteps

IMAGE_FPS = 120  # the reference embeds fps 120 for single images (opensora/datasets IMG_FPS)
VIDEO_FPS = 24

NoiseFn = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]
Callback = Callable[[dict], None]


@dataclass
class RFlowOptions:
    """Every sampler setting of the reference; defaults are the RFLOW class defaults made practical."""

    num_steps: int = 30  # official: num_sampling_steps
    cfg_scale: float = 7.0  # text guidance (1.2 configs 7.0, 1.3 configs 7.5)
    version: str = "1.2"  # selects the frame term of the timestep transform
    use_timestep_transform: bool = True
    use_discrete_timesteps: bool = False
    bf16_inputs: bool = False  # quirk Q2: schedule ratio from bf16 H/W/frames like the bf16 reference
    use_oscillation_guidance: bool = False  # text guidance 1.0 on odd steps from force_num on
    force_num: int = 10
    use_flaw_fix: bool = False  # t2v only: v *= 0.7 std(v_cond) / std(v) + 0.3
    image_cfg_scale: float | None = None  # None: cfg_scale, as the sampler (the 1.3 CLI passes 7.5)
    use_oscillation_guidance_for_image: bool | None = None  # None: same as use_oscillation_guidance
    scale_image_weight: bool = False  # per-frame image-guidance ramp
    initial_image_scale: float = 1.0
    use_sdedit: bool = False  # re-noise the conditioned frames from the reference at every step
    skip_redundant_passes: bool = True  # don't run passes whose guidance weight is exactly 1.0

    def __post_init__(self) -> None:
        if str(self.version) not in V1_VERSIONS:
            raise ValueError(f"unknown version {self.version!r}; allowed: {', '.join(V1_VERSIONS)}")
        if int(self.num_steps) != self.num_steps or self.num_steps < 1:
            raise ValueError(f"num_steps must be a whole number >= 1, got {self.num_steps}")
        if self.force_num < 0:
            raise ValueError(f"force_num must be >= 0, got {self.force_num}")
        for name in ("cfg_scale", "image_cfg_scale", "initial_image_scale"):
            value = getattr(self, name)
            if value is not None and not torch.isfinite(torch.tensor(float(value))):
                raise ValueError(f"{name} must be a finite number, got {value}")


@dataclass
class RFlowText:
    """T5 conditioning. `y_null` is the learned y_embedding ([B or 1, 1, L, C] or [L, C]); the model masks
    it with the POSITIVE prompt's mask (quirk Q1). A negative prompt (1.3) replaces it as the text uncond."""

    y: torch.Tensor  # [B, 1, L, C]
    mask: torch.Tensor  # [B, L], 1 = valid token
    y_null: torch.Tensor | None = None
    negative_y: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None


@dataclass
class FrameMaskConditioning:
    """1.2 mask strategy: per latent frame edit ratio m (1 = generate; m < 1 = keep the reference that is
    already written into z until t <= 1000 m, then noise it once and generate). See conditioning_v1."""

    frame_mask: torch.Tensor  # [B, T] float


@dataclass
class ReferenceConditioning:
    """1.3 i2v / v2v: reference latents placed at their frames, and the conditioned frame indices."""

    latent: torch.Tensor  # [B, C, T, H, W]; only the frames in mask_index are used
    mask_index: list[int] = field(default_factory=list)


def default_noise(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device)


def max_passes(has_reference: bool) -> int:
    """The passes a step runs at most: cond and uncond, plus image uncond with a 1.3 reference."""
    return 3 if has_reference else 2


def needed_passes(has_reference: bool, text_scale: float, image_scale: float | torch.Tensor) -> int:
    """How many of the passes (cond, uncond, image uncond) a step's guided velocity depends on: the image term
    needs all three unless its scale is 1.0 (it folds into uncond); without it, uncond only when text_scale != 1."""
    if has_reference and not (isinstance(image_scale, float) and image_scale == 1.0):
        return 3
    return 2 if text_scale != 1.0 else 1


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t/1000) x0 + (t/1000) eps, with the reference's operation order."""
    keep = 1 - t.float() / NUM_TIMESTEPS  # the reference builds 1 - (1 - s), not s, for the noise weight
    return keep * x0 + (1 - keep) * noise


def flaw_fix(v: torch.Tensor, v_cond: torch.Tensor) -> torch.Tensor:
    """Rescale the guided velocity toward the conditional one's std (per sample, all non-batch dims)."""
    dims = list(range(1, v.dim()))
    std_cond = v_cond.std(dim=dims, keepdim=True)
    std_guided = v.std(dim=dims, keepdim=True)
    # A constant guided velocity has std 0: the reference gives NaN there, keep v instead.
    ratio = torch.where(std_guided > 0, std_cond / std_guided, torch.ones_like(std_guided))
    return v * (0.7 * ratio + (1 - 0.7))


def image_scale_ramp(image_scale: float, initial: float, step: int, num_steps: int, frames: int) -> torch.Tensor:
    """1.3 per-frame image guidance [1, 1, T, 1, 1]: linspace(initial, u_i, T), u_i = linspace(g, initial, N)[i]."""
    upper = torch.linspace(image_scale, initial, num_steps)[step]
    return torch.linspace(initial, upper.item(), frames).view(1, 1, frames, 1, 1)


def step_scales(
    options: RFlowOptions, step: int, num_steps: int, frames: int, has_reference: bool
) -> tuple[float, float | torch.Tensor]:
    """(text scale, image scale) of one step: oscillation, and the 1.3 per-frame image ramp."""
    text_scale = options.cfg_scale
    if options.use_oscillation_guidance:
        text_scale = oscillation_scale(options.cfg_scale, step, options.force_num)
    image_scale: float | torch.Tensor = 1.0
    if has_reference:
        image_cfg = options.cfg_scale if options.image_cfg_scale is None else options.image_cfg_scale
        oscillate = options.use_oscillation_guidance_for_image
        if oscillate is None:
            oscillate = options.use_oscillation_guidance
        image_scale = oscillation_scale(image_cfg, step, options.force_num) if oscillate else image_cfg
        if options.scale_image_weight and image_scale > options.initial_image_scale:
            image_scale = image_scale_ramp(image_scale, options.initial_image_scale, step, num_steps, frames)
    return text_scale, image_scale


def guided_velocity(
    velocities: list[torch.Tensor] | tuple[torch.Tensor, ...],
    text_scale: float,
    image_scale: float | torch.Tensor = 1.0,
    use_flaw_fix: bool = False,
) -> torch.Tensor:
    """Combine [v_cond, v_text_uncond, (v_all_uncond)] as the reference does (1.x velocity convention).

    v_c + (g - 1)(v_c - v_u) is the reference's v_u + g(v_c - v_u) reordered, so a skipped pass (g == 1)
    contributes an exact zero. With three passes the image term (g_img - 1)(v_u - v_u2) is added.
    """
    v = velocities[0]
    if len(velocities) >= 2:
        v = v + (text_scale - 1) * (v - velocities[1])
    if len(velocities) == 3:
        v = v + (image_scale - 1) * (velocities[1] - velocities[2])
    if use_flaw_fix and len(velocities) == 2:
        v = flaw_fix(v, velocities[0])  # at one pass the factor is exactly 1
    return v


def _batch_of(tensor: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    if tensor.dim() == 2:  # [L, C], the raw y_embedding
        tensor = tensor[None, None]
    if tensor.dim() != 4:
        raise ValueError(f"{name} must be [B, 1, L, C], got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 1 and batch > 1:
        tensor = tensor.expand(batch, *tensor.shape[1:])
    if tensor.shape[0] != batch:
        raise ValueError(f"{name} has batch {tensor.shape[0]}, the latent has batch {batch}")
    return tensor


def _check_text(text: RFlowText, batch: int, needs_null: bool) -> RFlowText:
    y = _batch_of(text.y, batch, "text.y")
    mask = text.mask
    if mask.dim() == 2 and mask.shape[0] == 1:
        mask = mask.expand(batch, -1)
    if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] != y.shape[2]:
        raise ValueError(f"text.mask must be [B={batch}, L={y.shape[2]}], got shape {tuple(mask.shape)}")
    y_null = None
    if text.y_null is not None:
        y_null = _batch_of(text.y_null, batch, "text.y_null")
        if y_null.shape[2:] != y.shape[2:]:
            raise ValueError(f"text.y_null tokens/channels {tuple(y_null.shape[2:])} != text.y {tuple(y.shape[2:])}")
    elif needs_null:
        raise ValueError("text.y_null (the model's y_embedder.y_embedding) is required for this sampling mode")
    negative_y, negative_mask = text.negative_y, text.negative_mask
    if (negative_y is None) != (negative_mask is None):
        raise ValueError("a negative prompt needs both negative_y and negative_mask")
    if negative_y is not None:
        negative_y = _batch_of(negative_y, batch, "text.negative_y")
        if negative_mask.dim() == 2 and negative_mask.shape[0] == 1:
            negative_mask = negative_mask.expand(batch, -1)
        if negative_mask.shape != (batch, negative_y.shape[2]):
            raise ValueError(
                f"text.negative_mask must be [B={batch}, L={negative_y.shape[2]}], got {tuple(negative_mask.shape)}"
            )
    return RFlowText(y, mask, y_null, negative_y, negative_mask)


def _normalize_mask_index(mask_index: list[int], frames: int) -> list[int]:
    out = []
    for index in mask_index:
        if not -frames <= int(index) < frames:
            raise ValueError(f"mask_index {index} is outside the {frames} latent frames")
        out.append(int(index) % frames)
    return sorted(set(out))


def bf16_size(value: float | torch.Tensor) -> float | torch.Tensor:
    """A size or fps input as the official bf16 inference holds it (quirk Q2: 854 -> 856), for the DiT's pos-emb /
    RoPE scale; a Python number stays one."""
    if isinstance(value, torch.Tensor):
        return value.to(torch.bfloat16).to(value.dtype)
    return float(torch.tensor(float(value), dtype=torch.bfloat16))


def conditioning_fps(fps: float | None, num_frames: int | None) -> float:
    """The fps the DiT is conditioned on: 120 for a single image whatever fps was asked for (the reference's
    `fps if num_frames > 1 else IMG_FPS`), else `fps` (default 24)."""
    if num_frames == 1:
        return IMAGE_FPS
    return VIDEO_FPS if fps is None else fps


def _pass_inputs(
    num_passes: int, rows: dict[str, list[torch.Tensor]], step_mask: torch.Tensor | None, fixed: dict
) -> dict:
    """The model's keyword inputs for a step's first num_passes passes batched: each of `rows` cut to num_passes and
    concatenated, the step's x_mask repeated per pass, and the inputs every pass shares (`fixed`)."""
    kwargs = {name: torch.cat(values[:num_passes]) for name, values in rows.items()}
    if step_mask is not None:
        kwargs["x_mask"] = step_mask.repeat(num_passes, 1)
    return {**kwargs, **fixed}


def sample_rflow(
    model: Callable[..., torch.Tensor],
    z: torch.Tensor,
    text: RFlowText,
    options: RFlowOptions,
    *,
    height: int,
    width: int,
    num_frames: int,
    fps: float | None = None,
    cond: FrameMaskConditioning | ReferenceConditioning | None = None,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Run the 1.x RFlow sampler from the starting latent `z` [B, C, T, H, W] and return the final latent.

    `model(x, timestep, y=, mask=, fps=, height=, width=, [x_mask=], [cond=, cond_mask=, mask_index=, y_null=])`
    is an STDiT3 forward; only the first C output channels (the velocity) are used. `height` / `width` /
    `num_frames` are the PIXEL sizes (they set the schedule and the model's position scale). `fps` defaults
    to 24; a single image is always conditioned on 120, as the reference does (conditioning_fps).
    `noise(shape, dtype, device)` makes every normal draw inside the sampler, in the reference's order. `callback` gets
    dict(i, total, t, x=latent after the step, denoised=predicted clean latent) after every step.
    """
    if z.dim() != 5:
        raise ValueError(f"z must be a [B, C, T, H, W] latent, got shape {tuple(z.shape)}")
    noise = noise or default_noise
    batch, channels, frames = z.shape[:3]
    device = z.device

    frame_mask = None
    reference = None
    if isinstance(cond, FrameMaskConditioning):
        frame_mask = cond.frame_mask.to(device=device, dtype=torch.float32)
        if frame_mask.shape != (batch, frames):
            raise ValueError(f"frame_mask must be [B={batch}, T={frames}], got {tuple(cond.frame_mask.shape)}")
    elif isinstance(cond, ReferenceConditioning):
        if cond.latent.shape != z.shape:
            raise ValueError(f"reference latent shape {tuple(cond.latent.shape)} != latent shape {tuple(z.shape)}")
        mask_index = _normalize_mask_index(list(cond.mask_index), frames)
        if mask_index:
            reference = cond.latent.to(device=device, dtype=z.dtype)
    elif cond is not None:
        raise ValueError(f"cond must be FrameMaskConditioning, ReferenceConditioning or None, got {type(cond)}")

    text = _check_text(text, batch, needs_null=reference is not None or text.negative_y is None)
    uncond_y = text.negative_y if text.negative_y is not None else text.y_null
    uncond_mask = text.negative_mask if text.negative_y is not None else text.mask

    timesteps = rflow_timesteps(
        options.num_steps,
        height,
        width,
        num_frames,
        options.version,
        use_timestep_transform=options.use_timestep_transform,
        bf16_inputs=options.bf16_inputs,
        use_discrete_timesteps=options.use_discrete_timesteps,
    ).to(device)
    num_steps = len(timesteps)
    fps = conditioning_fps(fps, num_frames)
    size_args = {
        name: torch.full((batch,), float(value), dtype=torch.float32, device=device)
        for name, value in (("fps", fps), ("height", height), ("width", width))
    }
    if options.bf16_inputs:  # the bf16 reference also hands the model bf16-rounded sizes
        size_args = {name: bf16_size(value) for name, value in size_args.items()}

    # Each model input's rows for the passes (cond, uncond, image uncond); a step takes its first num_passes.
    rows = {"y": [text.y, uncond_y, uncond_y], "mask": [text.mask, uncond_mask, uncond_mask]}
    fixed = dict(size_args)
    cond_latent = cond_mask = None
    if reference is not None:
        cond_mask = torch.zeros_like(z)
        cond_mask[:, :, mask_index] = 1.0
        cond_latent = reference * cond_mask
        rows["cond"] = [cond_latent, cond_latent, torch.zeros_like(cond_latent)]
        rows["cond_mask"] = [cond_mask] * 3
        # One null caption per row (the reference repeats it batch x batch times and crashes for B > 1).
        rows["y_null"] = [text.y_null] * 3
        fixed["mask_index"] = mask_index

    noise_added = frame_mask == 1 if frame_mask is not None else None
    for i in range(num_steps):
        t_now = timesteps[i]
        t_batch = t_now.expand(batch)

        step_mask = None
        if frame_mask is not None:
            x0 = z.clone()
            eps = noise(tuple(x0.shape), x0.dtype, device)  # drawn every step, as the reference
            x_noise = add_noise(x0, eps, t_batch[:, None, None, None, None])
            step_mask = frame_mask * NUM_TIMESTEPS >= t_batch[:, None]
            newly_active = step_mask & ~noise_added
            z = torch.where(newly_active[:, None, :, None, None], x_noise, x0)
            noise_added = step_mask

        if reference is not None and options.use_sdedit:
            eps = noise(tuple(cond_latent.shape), cond_latent.dtype, device)
            z_noise = add_noise(cond_latent, eps, t_batch[:, None, None, None, None])
            z = torch.where(cond_mask == 1, z_noise, z)

        text_scale, image_scale = step_scales(options, i, num_steps, frames, reference is not None)
        if torch.is_tensor(image_scale):
            image_scale = image_scale.to(device=device, dtype=z.dtype)
        if options.skip_redundant_passes:
            num_passes = needed_passes(reference is not None, text_scale, image_scale)
        else:
            num_passes = max_passes(reference is not None)

        x_in = torch.cat([z] * num_passes)
        out = model(x_in, t_now.repeat(batch * num_passes), **_pass_inputs(num_passes, rows, step_mask, fixed))
        velocities = out[:, :channels].float().contiguous().chunk(num_passes, dim=0)

        v = guided_velocity(velocities, text_scale, image_scale, options.use_flaw_fix and reference is None)

        denoised = z + t_now / NUM_TIMESTEPS * v
        dt = (timesteps[i] - timesteps[i + 1] if i < num_steps - 1 else timesteps[i]) / NUM_TIMESTEPS
        z = z + v * dt
        if step_mask is not None:
            z = torch.where(step_mask[:, None, :, None, None], z, x0)
        if callback is not None:
            callback({"i": i, "total": num_steps, "t": float(t_now), "x": z, "denoised": denoised})
    return z
