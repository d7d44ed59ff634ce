"""Open-Sora 1.x image / video conditioning for the RFlow sampler.

* 1.2 mask strategies: "loop,ref_id,ref_start,target_start,length,edit_ratio" groups joined by ';'
  (`parse_mask_strategy`, `apply_mask_strategy`), indices in latent frames, optionally snapped to `align`.
* 1.3 cond types (i2v_head / i2v_tail / i2v_loop / v2v_head) or any frame placement
  (`reference_conditioning`, `place_references`), giving the sampler's mask_index conditioning.
* Long videos by chained extension (`sample_long_video`): every later chunk is conditioned on the last
  `condition_frame_length` latent frames of the previous one, and those frames are dropped when joining.

Reference latents are tensors [C, T, H, W] (shared by the batch) or [B, C, T, H, W] (B may be 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from .rflow import (
    Callback,
    FrameMaskConditioning,
    NoiseFn,
    ReferenceConditioning,
    RFlowOptions,
    RFlowText,
    default_noise,
    sample_rflow,
)

MASK_STRATEGY_FORMAT = "loop,ref_id,ref_start,target_start,length,edit_ratio"
MASK_STRATEGY_FIELDS = ("loop", "ref_id", "ref_start", "target_start", "length", "edit_ratio")
COND_TYPES = ("i2v_head", "i2v_tail", "i2v_loop", "v2v_head")
CONDITION_FRAME_LENGTH = 5
MAX_LOOPS = 32  # chunks of one long video the nodes offer
LATENT_WINDOW = 5  # the 1.x VAEs code each 17-frame window as 5 latent frames
V12_ALIGN = 5  # configs/opensora-v1-2/inference/sample.py `align = 5`: reference targets snap to multiples of 5


@dataclass(frozen=True)
class MaskStrategy:
    """One group of a 1.2 mask strategy; missing trailing fields take these defaults (as the reference)."""

    loop: int = 0
    reference_index: int = 0
    reference_start: int = 0
    target_start: int = 0
    length: int = 1
    edit_ratio: float = 0.0


def parse_mask_strategy(text: str | None) -> list[MaskStrategy]:
    """Parse "0,0,0,0,1,0;0,1,0,-1,1,0.5"-style strings; an empty string means no conditioning."""
    if text is None or text.strip() == "":
        return []
    strategies = []
    for number, group in enumerate(text.split(";"), start=1):
        fields = group.split(",")
        where = f"mask strategy group {number} ({group!r})"
        if len(fields) > len(MASK_STRATEGY_FIELDS):
            raise ValueError(f"{where} has {len(fields)} fields; at most 6 are allowed: {MASK_STRATEGY_FORMAT}")
        values: list[float] = []
        for name, raw in zip(MASK_STRATEGY_FIELDS, fields):
            try:
                values.append(float(raw) if name == "edit_ratio" else int(raw))
            except ValueError:
                kind = "a number in [0, 1]" if name == "edit_ratio" else "an integer"
                raise ValueError(
                    f"{where}: {name} must be {kind}, got {raw.strip()!r} ({MASK_STRATEGY_FORMAT})"
                ) from None
        strategy = MaskStrategy(*values)
        if strategy.loop < 0 or strategy.reference_index < 0:
            raise ValueError(
                f"{where}: loop and ref_id must be >= 0, got {strategy.loop} and {strategy.reference_index}"
            )
        if strategy.length < 1:
            raise ValueError(f"{where}: length must be >= 1 latent frame, got {strategy.length}")
        if not 0.0 <= strategy.edit_ratio <= 1.0:
            raise ValueError(
                f"{where}: edit_ratio must be in [0, 1] (0 = keep, 1 = regenerate), got {strategy.edit_ratio}"
            )
        strategies.append(strategy)
    return strategies


def snap_to_alignment(value: int, align: int, limit: int) -> int:
    """Round a frame index to a multiple of `align`, rounding up only when that stays below `limit`."""
    steps = value // align
    if value % align > align / 2 and steps < limit // align - 1:
        steps += 1
    return steps * align


def _batched(reference: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    if reference.dim() == 4:
        reference = reference[None]
    if reference.dim() != 5 or reference.shape[0] not in (1, batch):
        raise ValueError(
            f"{name} must be [C, T, H, W] or [B, C, T, H, W] with B in (1, {batch}), got {tuple(reference.shape)}"
        )
    return reference.expand(batch, *reference.shape[1:])


def _check_reference(reference: torch.Tensor, latent_shape: Sequence[int], name: str) -> None:
    if reference.shape[1] != latent_shape[1] or reference.shape[3:] != tuple(latent_shape[3:]):
        raise ValueError(
            f"{name} has channels/size {reference.shape[1]} x {tuple(reference.shape[3:])}, the latent has "
            f"{latent_shape[1]} x {tuple(latent_shape[3:])}; encode the reference at the target size"
        )


def apply_mask_strategy(
    z: torch.Tensor,
    references: Sequence[torch.Tensor],
    strategies: str | Sequence[str] | Sequence[MaskStrategy],
    loop_index: int = 0,
    align: int | None = None,
) -> tuple[torch.Tensor, FrameMaskConditioning | None]:
    """Write the reference frames into a copy of z and build the per-frame edit-ratio mask.

    `strategies` is one string for the whole batch or one per batch item. Returns (z, None) when no frame is
    conditioned: an all-ones mask changes nothing (the sampler then skips the mask path).
    """
    if z.dim() != 5:
        raise ValueError(f"z must be [B, C, T, H, W], got shape {tuple(z.shape)}")
    batch, frames = z.shape[0], z.shape[2]
    if isinstance(strategies, str) or (strategies and isinstance(strategies[0], MaskStrategy)):
        strategies = [strategies] * batch
    if len(strategies) != batch:
        raise ValueError(f"got {len(strategies)} mask strategies for a batch of {batch}")
    if align is not None and align < 1:
        raise ValueError(f"align must be >= 1 or None, got {align}")
    refs = [_batched(r, batch, f"reference {k}") for k, r in enumerate(references)]
    for k, ref in enumerate(refs):
        _check_reference(ref, z.shape, f"reference {k}")

    z = z.clone()
    frame_mask = torch.ones(batch, frames, dtype=torch.float32, device=z.device)
    for item, item_strategies in enumerate(strategies):
        parsed = parse_mask_strategy(item_strategies) if isinstance(item_strategies, str) else list(item_strategies)
        for strategy in parsed:
            if strategy.loop != loop_index:
                continue
            if strategy.reference_index >= len(refs):
                raise ValueError(
                    f"mask strategy uses ref_id {strategy.reference_index} but only {len(refs)} reference(s) were given"
                )
            ref = refs[strategy.reference_index][item]
            ref_frames = ref.shape[1]
            ref_start = strategy.reference_start + (ref_frames if strategy.reference_start < 0 else 0)
            target_start = strategy.target_start + (frames if strategy.target_start < 0 else 0)
            if align is not None:
                ref_start = snap_to_alignment(ref_start, align, ref_frames)
                target_start = snap_to_alignment(target_start, align, frames)
            if not 0 <= ref_start < ref_frames:
                raise ValueError(f"ref_start {strategy.reference_start} is outside the reference's {ref_frames} frames")
            if not 0 <= target_start < frames:
                raise ValueError(f"target_start {strategy.target_start} is outside the latent's {frames} frames")
            length = min(strategy.length, frames - target_start, ref_frames - ref_start)
            z[item, :, target_start : target_start + length] = ref[:, ref_start : ref_start + length].to(z.dtype)
            frame_mask[item, target_start : target_start + length] = strategy.edit_ratio
    if bool((frame_mask == 1).all()):
        return z, None
    return z, FrameMaskConditioning(frame_mask)


def mask_strategies_for(mask_index: Sequence[int], reference_frames: int) -> list[MaskStrategy]:
    """1.2 mask-strategy groups writing reference frame min(k, last) at latent frame mask_index[k] (edit ratio 0,
    kept). Runs that are consecutive in both form one group (as the official "0,0,0,0,5,0" v2v strategy), so that
    aligning a group (V12_ALIGN) moves it whole."""
    groups: list[MaskStrategy] = []
    for slot, target in enumerate(mask_index):
        source = min(slot, reference_frames - 1)
        last = groups[-1] if groups else None
        if last and target == last.target_start + last.length and source == last.reference_start + last.length:
            groups[-1] = replace(last, length=last.length + 1)
        else:
            groups.append(MaskStrategy(reference_start=source, target_start=target))
    return groups


def image_strategies(mask_index: Sequence[int], images: int) -> list[MaskStrategy]:
    """1.2 strategies for images that are each their own reference (official "a.png;b.png" ref_ids), so aligning
    moves only the target: image min(k, images - 1) goes to latent frame mask_index[k]."""
    return [
        MaskStrategy(reference_index=min(slot, images - 1), target_start=target)
        for slot, target in enumerate(mask_index)
    ]


def place_references(
    latent_shape: Sequence[int],
    references: Sequence[torch.Tensor],
    placements: Sequence[tuple[int, int, int]],
) -> ReferenceConditioning:
    """Put reference frames at any latent frames: placements are (reference index, reference frame, target frame);
    negative frames count from the end."""
    batch, _, frames = latent_shape[:3]
    refs = [_batched(r, batch, f"reference {k}") for k, r in enumerate(references)]
    if not refs:
        raise ValueError("reference conditioning needs at least one reference latent")
    latent = torch.zeros(tuple(latent_shape), dtype=refs[0].dtype, device=refs[0].device)
    mask_index = []
    for ref_id, ref_frame, target in placements:
        if not 0 <= ref_id < len(refs):
            raise ValueError(f"placement uses reference {ref_id} but {len(refs)} reference(s) were given")
        ref = refs[ref_id]
        _check_reference(ref, latent_shape, f"reference {ref_id}")
        if not -ref.shape[2] <= ref_frame < ref.shape[2]:
            raise ValueError(f"reference frame {ref_frame} is outside reference {ref_id}'s {ref.shape[2]} frames")
        if not -frames <= target < frames:
            raise ValueError(f"target frame {target} is outside the latent's {frames} frames")
        latent[:, :, target % frames] = ref[:, :, ref_frame]
        mask_index.append(target % frames)
    return ReferenceConditioning(latent, sorted(set(mask_index)))


def cond_type_placements(
    cond_type: str,
    latent_frames: int,
    reference_lengths: Sequence[int],
    condition_frame_length: int = CONDITION_FRAME_LENGTH,
    head: bool = True,
    tail: bool = True,
) -> list[tuple[int, int, int]]:
    """The 1.3 cond types as placements. `head` / `tail` switch the two ends off for chained chunks."""
    if cond_type not in COND_TYPES:
        raise ValueError(f"unknown cond_type {cond_type!r}; allowed: {', '.join(COND_TYPES)}")
    if not reference_lengths:
        raise ValueError(f"cond_type {cond_type!r} needs a reference latent")
    last = latent_frames - 1
    if cond_type == "v2v_head":
        count = min(condition_frame_length, reference_lengths[0], latent_frames)
        return [(0, k, k) for k in range(count)] if head else []
    placements = []
    if head and cond_type in ("i2v_head", "i2v_loop"):
        placements.append((0, 0, 0))
    if tail and cond_type == "i2v_tail":
        placements.append((0, -1, last))
    if tail and cond_type == "i2v_loop":
        # One reference: its last frame (the image itself); two: the first frame of the second one.
        placements.append((0, -1, last) if len(reference_lengths) == 1 else (1, 0, last))
    return placements


def reference_conditioning(
    cond_type: str,
    references: Sequence[torch.Tensor],
    latent_shape: Sequence[int],
    condition_frame_length: int = CONDITION_FRAME_LENGTH,
) -> ReferenceConditioning:
    """1.3 i2v / v2v conditioning for one generation: i2v_head [0], i2v_tail [T-1], i2v_loop [0, T-1],
    v2v_head the first min(condition_frame_length, reference length, T) frames."""
    lengths = [(r.shape[1] if r.dim() == 4 else r.shape[2]) for r in references]
    placements = cond_type_placements(cond_type, latent_shape[2], lengths, condition_frame_length)
    return place_references(latent_shape, references, placements)


def loop_placements(
    cond_type: str,
    latent_frames: int,
    reference_lengths: Sequence[int],
    num_loops: int,
    condition_frame_length: int = CONDITION_FRAME_LENGTH,
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(first chunk's placements, last chunk's end placements) of a 1.3 cond type over `num_loops` chunks: one chunk
    has both ends; with more, the i2v_tail / i2v_loop end frame moves to the last chunk (official
    prep_ref_and_mask: i2v_tail leaves the first chunk unconditioned)."""
    if num_loops == 1:
        return cond_type_placements(cond_type, latent_frames, reference_lengths, condition_frame_length), []
    head = cond_type_placements(cond_type, latent_frames, reference_lengths, condition_frame_length, tail=False)
    end = cond_type_placements(cond_type, latent_frames, reference_lengths, condition_frame_length, head=False)
    return head, end


def _item_strategies(mask_strategy: str | Sequence, batch: int) -> list[list[MaskStrategy]]:
    """One parsed list of groups per batch item, from one string / group list for all or one per item."""
    if isinstance(mask_strategy, str) or not mask_strategy or isinstance(mask_strategy[0], MaskStrategy):
        mask_strategy = [mask_strategy] * batch
    if len(mask_strategy) != batch:
        raise ValueError(f"got {len(mask_strategy)} mask strategies for a batch of {batch}")
    return [parse_mask_strategy(s) if isinstance(s, str) else list(s) for s in mask_strategy]


def chunk_conditioning(
    z: torch.Tensor,
    loop: int,
    num_loops: int,
    previous: torch.Tensor | None = None,
    *,
    references: Sequence[torch.Tensor] = (),
    mask_strategy: str | Sequence = "",
    align: int | None = None,
    placements: Sequence[tuple[int, int, int]] | None = None,
    end_placements: Sequence[tuple[int, int, int]] = (),
    condition_frame_length: int = CONDITION_FRAME_LENGTH,
    condition_frame_edit: float = 0.0,
) -> tuple[torch.Tensor, FrameMaskConditioning | ReferenceConditioning | None]:
    """(z, sampler conditioning) of chunk `loop` of a chained long video; `previous` is chunk loop - 1's sample.

    `placements` None is the mask-strategy way (1.2, and 1.3 without a reference): `mask_strategy` groups of loop
    index `loop` apply, and a later chunk also keeps the previous chunk's last `condition_frame_length` latent frames
    as its first ones with edit ratio `condition_frame_edit` (the official append_generated; the official 1.3 script
    tags that group with the finished loop's index, so its later chunks are not conditioned at all: quirk, not
    copied). Otherwise the reference way (1.3 mask_index): chunk 0 takes `placements`, a later chunk the previous
    chunk's last frames at 0.. plus, on the last chunk, `end_placements` (official prep_ref_and_update_mask_in_loop)."""
    cfl = condition_frame_length
    if loop > 0:
        check_condition_frame_length(cfl, z.shape[2])
        if previous is None:
            raise ValueError(f"chunk {loop} continues the previous chunk's sample: pass it as `previous`")
    if placements is None:
        references, strategies = list(references), _item_strategies(mask_strategy, z.shape[0])
        if loop > 0:
            references.append(previous)
            added = MaskStrategy(loop, len(references) - 1, -cfl, 0, cfl, condition_frame_edit)
            strategies = [[*groups, added] for groups in strategies]
        return apply_mask_strategy(z, references, strategies, loop_index=loop, align=align)
    if loop == 0:
        return z, (place_references(z.shape, references, placements) if placements else None)
    chained = [(0, k, k) for k in range(cfl)]
    if loop == num_loops - 1:
        chained += [(ref_id + 1, ref_frame, target) for ref_id, ref_frame, target in end_placements]
    return z, place_references(z.shape, [previous[:, :, -cfl:], *references], chained)


def check_condition_frame_length(condition_frame_length: int, frames: int) -> None:
    """A chained chunk continues from fewer latent frames than it has."""
    if not 1 <= condition_frame_length < frames:
        raise ValueError(
            f"condition_frame_length must be between 1 and {frames - 1} (the chunk has {frames} latent frames), "
            f"got {condition_frame_length}: a longer video continues from fewer frames than it has"
            if frames > 1
            else "loops continue a video: this latent is one latent frame (an image); make a video latent"
        )


def check_latent_windows(frames: int, condition_frame_length: int) -> None:
    """Chunks joined in latent space decode right only when every chunk starts on a VAE window (LATENT_WINDOW latent
    frames per 17-frame window, whose first latent frame is coded differently): so the chunk length and the frames
    it continues from are multiples of it. (The official 1.3 script accepts any length and misplaces the windows;
    the official 1.2 joins decoded frames and asserts a multiple of 5.)"""
    if frames % LATENT_WINDOW or condition_frame_length % LATENT_WINDOW:
        raise ValueError(
            f"loops join chunks in latent space, where the 1.x VAE codes each 17-frame window as {LATENT_WINDOW} latent "
            f"frames: condition_frame_length must be a multiple of {LATENT_WINDOW} (official 5), got "
            f"{condition_frame_length}, and the latent's length too, got {frames} latent frames (1.2: num_frames a "
            "multiple of 17, e.g. 51 or 102; 1.3 always is)"
        )


def join_chunks(chunks: Sequence[torch.Tensor], condition_frame_length: int) -> torch.Tensor:
    """The long video's latent: the chunks along time, each later one without its repeated first frames."""
    return torch.cat([chunks[0], *(chunk[:, :, condition_frame_length:] for chunk in chunks[1:])], dim=2)


def sample_long_video(
    model,
    texts: RFlowText | Sequence[RFlowText],
    options: RFlowOptions,
    *,
    latent_shape: Sequence[int],
    num_loops: int,
    height: int,
    width: int,
    num_frames: int,
    fps: float | None = None,
    references: Sequence[torch.Tensor] = (),
    mask_strategy: str | Sequence = "",
    align: int | None = None,
    cond_type: str | None = None,
    placements: Sequence[tuple[int, int, int]] | None = None,
    end_placements: Sequence[tuple[int, int, int]] = (),
    condition_frame_length: int = CONDITION_FRAME_LENGTH,
    condition_frame_edit: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    noise: NoiseFn | None = None,
    start_noise: Callable[[int], torch.Tensor] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Generate `num_loops` chunks, each conditioned on the last `condition_frame_length` latent frames of the
    previous one, and join them along time (dropping the repeated frames): T + (num_loops - 1)(T - cfl) frames.

    The chaining is chunk_conditioning's: the mask-strategy way by default, the 1.3 reference way with a 1.3
    `cond_type` (placements from loop_placements) or explicit `placements` / `end_placements`. `texts` is one prompt
    or one per chunk. Chunk k starts from `start_noise(k)` (default: a fresh `noise(latent_shape, dtype, device)`
    draw); `noise` is also the sampler's in-loop noise. The 1.2 reference works on decoded-then-re-encoded video;
    this chains latents directly, as 1.3 does. The callback's info also has "loop" and "loops".
    """
    if num_loops < 1:
        raise ValueError(f"num_loops must be >= 1, got {num_loops}")
    latent_shape = tuple(int(s) for s in latent_shape)
    if len(latent_shape) != 5:
        raise ValueError(f"latent_shape must be (B, C, T, H, W), got {latent_shape}")
    frames = latent_shape[2]
    if num_loops > 1:
        check_condition_frame_length(condition_frame_length, frames)
    if cond_type is not None:
        if placements is not None or any(_item_strategies(mask_strategy, latent_shape[0])):
            raise ValueError("use either cond_type (1.3 mask_index conditioning) or mask_strategy, not both")
        lengths = [(r.shape[1] if r.dim() == 4 else r.shape[2]) for r in references]
        placements, end_placements = loop_placements(cond_type, frames, lengths, num_loops, condition_frame_length)
    if isinstance(texts, RFlowText):
        texts = [texts]
    if len(texts) not in (1, num_loops):
        raise ValueError(f"got {len(texts)} texts for {num_loops} loops; give one, or one per loop")
    noise = noise or default_noise
    device = torch.device(device) if device is not None else texts[0].y.device
    start_noise = start_noise or (lambda _loop: noise(latent_shape, dtype, device))
    chaining = dict(
        references=references,
        mask_strategy=mask_strategy,
        align=align,
        placements=placements,
        end_placements=end_placements,
        condition_frame_length=condition_frame_length,
        condition_frame_edit=condition_frame_edit,
    )
    chunks: list[torch.Tensor] = []
    for loop in range(num_loops):
        previous = chunks[-1] if chunks else None
        z, cond = chunk_conditioning(start_noise(loop), loop, num_loops, previous, **chaining)

        def chunk_callback(info: dict, loop: int = loop) -> None:
            callback({**info, "loop": loop, "loops": num_loops})

        chunks.append(
            sample_rflow(
                model,
                z,
                texts[loop] if len(texts) > 1 else texts[0],
                options,
                height=height,
                width=width,
                num_frames=num_frames,
                fps=fps,
                cond=cond,
                noise=noise,
                callback=chunk_callback if callback is not None else None,
            )
        )
    return join_chunks(chunks, condition_frame_length)
