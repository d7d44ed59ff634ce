"""Check core ComfyUI's HunyuanVideo VAE (the VAELoader path) against the official golden round trip.

    python scripts/verify_hunyuan_vae.py [CASE_DIR] [--json OUT]

CASE_DIR defaults to tests/fixtures/opensora/hunyuan_vae_roundtrip (official Open-Sora 2.0 hunyuan_vae, tiny
random weights, float32). Runs ComfyUI's own code with `--cpu` argument parsing, in this process, so run it as
its own process (ComfyUI parses argv and picks devices at import time).

What runs is core's VAELoader path: comfy.utils.load_torch_file -> comfy.sd.VAE(sd) (diffusers->ldm key
conversion, detection of the 3-D Hunyuan layout, AutoencoderKL with conv3d / time_compress 4, load). Two test-only
patches make core build the fixture's tiny architecture instead of the released one, and nothing else:
  1. comfy.sd.VAE.__init__ hard-codes ch 128, ch_mult [1,2,4,4], num_res_blocks 2 for this layout: the
     AutoencoderKL(...) call it makes gets the fixture's ch / ch_mult / num_res_blocks swapped into its ddconfig.
  2. core's Normalize() hard-codes GroupNorm(32 groups); the fixture uses norm_num_groups 16: Normalize's default
     num_groups is set to 16 while the model is built (GroupNorm(32) cannot even be built on 16 channels).
Both are undone right after construction. Comparisons use the fixture tolerance (|d| <= atol + rtol |golden|).

Checks (all deterministic: posterior mean; latent = mean * 0.476986; decode takes latent / 0.476986):
  - the `small` clip (5 frames, 2 latent frames, below the tile size) as core ships: directly on the
    AutoencoderKL and through the VAE.encode / VAE.decode wrapper the nodes use (0..1 images in; decode clamped
    to 0..1). Core's mid-block attention (AttnBlock) attends over all frames; the official one has a
    frame-causal mask, so these differ.
  - the same clip with core's mid attention given the official frame-causal mask (the same one-head attention
    otherwise; opensora_lib.attention.frame_causal_attention, which the node installs): everything else is core's
    code, so a match here means the mask is the only difference.
    Newer core also runs the encoder / decoder in temporal chunks (GroupNorm per chunk, not over the video as
    the official); the masked variant runs the whole video (chunks off), and the masked-but-chunked encode is
    reported for information (`masked.chunked.small.latent`). `load.temporal_chunks` says which host this is.
  - one latent frame: the mask is inert there, so core as shipped equals the masked core (exactly).
    (A first-frame-only comparison with the fixture is not possible: GroupNorm statistics span all frames, so
    the reference's first latent frame depends on the later frames too.)
  - `tiled` outputs: the official blends 64-px tiles (blend/row-limit rule); core's VAE.encode/decode do not
    tile (only on OOM, with a different feathering scheme), so these are reported for information only.
  - the pack's fix, nodes/hunyuan_vae.py (OpenSoraHunyuanVAE().patch(vae)): the VAE copy it returns matches the
    fixture on the `small` clip (model and VAE.encode / VAE.decode wrapper), its encode_tiled / decode_tiled equal
    the masked core's, it shares every weight with the original, and the original VAE object is unchanged
    afterwards (same attention functions, same outputs as before, still different from the fixture). With
    whole_video off it keeps a newer core's chunks (`node.chunked.*`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CASE = REPO / "tests" / "fixtures" / "opensora" / "hunyuan_vae_roundtrip"
KERNEL_NOISE_ATOL = 1e-5  # two float32 runs of the same maths through different attention kernels


def boot_comfy() -> None:
    """Import ComfyUI as its own entry points do, CPU only."""
    sys.path.insert(0, str(REPO / "scripts"))
    from comfy_host import comfyui_dir

    comfy_dir = comfyui_dir()
    sys.path.insert(0, str(comfy_dir))
    os.chdir(comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()


def tiny_architecture(config: dict) -> dict:
    """core ddconfig sizes for the fixture's diffusers-style config."""
    widths = list(config["block_out_channels"])
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ValueError(
            f"block_out_channels {widths} are not multiples of {ch}: core's ch * ch_mult cannot express them"
        )
    return {"ch": ch, "ch_mult": [w // ch for w in widths], "num_res_blocks": int(config["layers_per_block"])}


@contextlib.contextmanager
def fixture_architecture(config: dict):
    """Patches 1 and 2 of the module docstring, for the duration of VAE construction only."""
    import comfy.ldm.modules.diffusionmodules.model as ldm_model
    import comfy.sd

    sizes = tiny_architecture(config)
    real_autoencoder = comfy.sd.AutoencoderKL
    real_defaults = ldm_model.Normalize.__defaults__

    def autoencoder(ddconfig, embed_dim, **kwargs):
        return real_autoencoder(ddconfig={**ddconfig, **sizes}, embed_dim=embed_dim, **kwargs)

    comfy.sd.AutoencoderKL = autoencoder
    ldm_model.Normalize.__defaults__ = (int(config["norm_num_groups"]),)
    try:
        yield
    finally:
        comfy.sd.AutoencoderKL = real_autoencoder
        ldm_model.Normalize.__defaults__ = real_defaults


def compare(actual, expected, atol: float, rtol: float) -> dict:
    diff = (actual.double() - expected.double()).abs()
    if actual.shape != expected.shape:
        return {"passed": False, "detail": f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"}
    return {
        "passed": bool((diff <= atol + rtol * expected.double().abs()).all()),
        "max_abs": float(diff.max()),
        "shape": list(actual.shape),
    }


def zip_pair(first: tuple, second: tuple, index: int) -> tuple:
    """(first[i], second[i], atol, rtol) for two runs of core that should agree to float32 kernel noise."""
    return first[index], second[index], KERNEL_NOISE_ATOL, 0.0


def verify(case_dir: Path) -> dict:  # noqa: C901 (one linear script of checks)
    import comfy.diffusers_convert
    import comfy.sd
    import comfy.utils
    import torch
    from comfy_host import pack_module
    from safetensors.torch import load_file

    # the pack's own mask function (plain torch; tests/test_hunyuan_vae_core.py checks it against the dense mask)
    frame_causal_attention = pack_module("opensora_lib.attention").frame_causal_attention
    meta = json.loads((case_dir / "case.json").read_text())
    config = meta["model_config"]
    io = load_file(str(case_dir / "io.safetensors"))
    atol, rtol = float(meta["tolerance"]["atol"]), float(meta["tolerance"]["rtol"])
    scale, shift = float(config["scale_factor"]), float(config.get("shift_factor", 0.0))
    if shift != 0.0:
        raise ValueError(f"shift_factor {shift}: core's HunyuanVideo latent format has no shift")

    report: dict = {"tolerance": {"atol": atol, "rtol": rtol}, "compare": {}, "info": {}}
    weights_path = str(case_dir / "weights.safetensors")
    sd = comfy.utils.load_torch_file(weights_path)  # what VAELoader.load_vae does
    with fixture_architecture(config):
        vae = comfy.sd.VAE(sd=dict(sd), dtype=torch.float32)
    vae.throw_exception_if_invalid()
    model = vae.first_stage_model

    converted = comfy.diffusers_convert.convert_vae_state_dict(dict(sd))
    missing, unexpected = model.load_state_dict(converted, strict=False)
    state = model.state_dict()
    report["load"] = {
        "first_stage_model": type(model).__name__,
        "encoder_class": f"{type(model.encoder).__module__}.{type(model.encoder).__name__}",
        "latent_dim": vae.latent_dim,
        "latent_channels": vae.latent_channels,
        "upscale_index_formula": list(vae.upscale_index_formula),
        "downscale_index_formula": list(vae.downscale_index_formula),
        "vae_dtype": str(vae.vae_dtype),
        "checkpoint_tensors": len(sd),
        "converted_tensors": len(converted),
        "missing_keys": sorted(missing),
        "unexpected_keys": sorted(unexpected),
        "max_weight_diff": max(float((state[k].double() - v.double()).abs().max()) for k, v in converted.items()),
        "group_norm_groups": sorted({m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}),
        "mid_attention": type(model.encoder.mid.attn_1).__name__,
        # newer core runs encoder / decoder in temporal chunks (GroupNorm per chunk); 0.3.75 has no such switch
        "temporal_chunks": [
            bool(getattr(model.encoder, "carried", False)),
            bool(getattr(model.decoder, "carried", False)),
        ],
    }
    chunked = [m for m in (model.encoder, model.decoder) if getattr(m, "carried", False)]
    check = report["compare"]

    def encode_moments(x):
        return model.quant_conv(model.encoder(x))

    x, z = io["small.x"], io["small.latent"]
    expected_images = ((io["small.decoded"] + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1)
    images = ((x[0] + 1) / 2).permute(1, 2, 3, 0)  # the [T, H, W, 3] 0..1 frames the nodes hand to VAE.encode
    with torch.inference_mode():
        # -- core as shipped: its mid-block attention has no frame-causal mask -----------------------------------
        check["small.moments"] = compare(encode_moments(x), io["small.moments"], atol, rtol)
        check["small.latent"] = compare(model.encode(x) * scale, z, atol, rtol)
        check["small.decoded"] = compare(model.decode(z / scale), io["small.decoded"], atol, rtol)
        check["wrapper.small.latent"] = compare(vae.encode(images) * scale, z, atol, rtol)
        check["wrapper.small.decoded"] = compare(vae.decode(z / scale), expected_images, atol, rtol)
        latent = model.encode(x) * scale
        report["info"]["small.latent_max_abs_per_frame"] = [
            float((latent[:, :, t] - z[:, :, t]).abs().max()) for t in range(z.shape[2])
        ]
        unmasked_single = (model.encode(x[:, :, :1]), model.decode(z[:, :, :1] / scale))

        # -- the same modules with the official frame-causal mask added to the mid attention --------------------
        attentions = [model.encoder.mid.attn_1, model.decoder.mid.attn_1]
        originals = [a.optimized_attention for a in attentions]
        for attention in attentions:
            attention.optimized_attention = frame_causal_attention
        try:
            if chunked:  # mask on, chunks kept (information: what a newer core gives with the mask alone)
                report["info"]["masked.chunked.small.latent"] = compare(model.encode(x) * scale, z, atol, rtol)
            for module in chunked:  # and the whole video at once, as the official VAE (and 0.3.75) run it
                module.carried = False
            check["masked.small.moments"] = compare(encode_moments(x), io["small.moments"], atol, rtol)
            check["masked.small.latent"] = compare(model.encode(x) * scale, z, atol, rtol)
            check["masked.small.decoded"] = compare(model.decode(z / scale), io["small.decoded"], atol, rtol)
            check["masked.wrapper.small.latent"] = compare(vae.encode(images) * scale, z, atol, rtol)
            check["masked.wrapper.small.decoded"] = compare(vae.decode(z / scale), expected_images, atol, rtol)
            # One latent frame (an image, or up to 4 frames): the mask has nothing to hide.
            masked_single = (model.encode(x[:, :, :1]), model.decode(z[:, :, :1] / scale))
            # (not bit-equal: core's attention call and SDPA with a mask may take different CPU kernels)
            check["single_latent_frame.mask_is_inert.latent"] = compare(*zip_pair(unmasked_single, masked_single, 0))
            check["single_latent_frame.mask_is_inert.decoded"] = compare(*zip_pair(unmasked_single, masked_single, 1))
            # Information only: the official tiles 64 px here; core's VAE.encode/decode do not tile, and its
            # VAE.encode_tiled/decode_tiled feather overlapping tiles differently (not the official blend/crop).
            info = report["info"]
            tiled_x, tiled_z = io["tiled.x"], io["tiled.latent"]
            info["masked.untiled_vs_official_tiled.latent"] = compare(
                model.encode(tiled_x) * scale, tiled_z, atol, rtol
            )
            info["masked.untiled_vs_official_tiled.decoded"] = compare(
                model.decode(tiled_z / scale), io["tiled.decoded"], atol, rtol
            )
            tiled_images = ((tiled_x[0] + 1) / 2).permute(1, 2, 3, 0)
            size = int(config["sample_size"])
            tile_args = {"tile_x": size, "tile_y": size, "overlap": size // 4}
            core_tiled = vae.encode_tiled(tiled_images, **tile_args) * scale
            info["masked.core_tiled_vs_official_tiled.latent"] = compare(core_tiled, tiled_z, atol, rtol)
            latent_tile = size // 8
            latent_tile_args = {"tile_x": latent_tile, "tile_y": latent_tile, "overlap": latent_tile // 4}
            core_decoded = vae.decode_tiled(tiled_z / scale, **latent_tile_args)
            expected_tiled = ((io["tiled.decoded"] + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1)
            info["masked.core_tiled_vs_official_tiled.decoded_0to1"] = compare(core_decoded, expected_tiled, atol, rtol)
        finally:
            for attention, original in zip(attentions, originals):
                attention.optimized_attention = original
            for module in chunked:
                module.carried = True

        # -- the pack's fix: OpenSoraHunyuanVAE returns a patched copy; the original must stay as it was -------
        unmasked_small = (model.encode(x) * scale, model.decode(z / scale), vae.encode(images) * scale)
        node = pack_module("nodes.hunyuan_vae").OpenSoraHunyuanVAE()
        fixed = node.patch(vae)[0]
        fixed_model = fixed.first_stage_model
        check["node.small.moments"] = compare(
            fixed_model.quant_conv(fixed_model.encoder(x)), io["small.moments"], atol, rtol
        )
        check["node.small.latent"] = compare(fixed_model.encode(x) * scale, z, atol, rtol)
        check["node.small.decoded"] = compare(fixed_model.decode(z / scale), io["small.decoded"], atol, rtol)
        check["node.wrapper.small.latent"] = compare(fixed.encode(images) * scale, z, atol, rtol)
        check["node.wrapper.small.decoded"] = compare(fixed.decode(z / scale), expected_images, atol, rtol)
        # core's tiled paths call the same (patched) modules: they equal the masked core's tiled results
        fixed_tiled = fixed.encode_tiled(tiled_images, **tile_args) * scale
        fixed_tiled_decoded = fixed.decode_tiled(tiled_z / scale, **latent_tile_args)
        check["node.encode_tiled_equals_masked_core"] = compare(fixed_tiled, core_tiled, KERNEL_NOISE_ATOL, 0.0)
        check["node.decode_tiled_equals_masked_core"] = compare(
            fixed_tiled_decoded, core_decoded, KERNEL_NOISE_ATOL, 0.0
        )
        fixed_single = (fixed_model.encode(x[:, :, :1]), fixed_model.decode(z[:, :, :1] / scale))
        check["node.single_latent_frame.latent"] = compare(*zip_pair(unmasked_single, fixed_single, 0))
        check["node.single_latent_frame.decoded"] = compare(*zip_pair(unmasked_single, fixed_single, 1))
        # whole_video off: a newer core's chunks stay (less memory, not the official numbers); 0.3.75: no effect
        chunks = node.patch(vae, whole_video=False)[0]
        check["node.chunked.small.latent"] = compare(chunks.first_stage_model.encode(x) * scale, z, atol, rtol)
        check["node.chunked.small.decoded"] = compare(
            chunks.first_stage_model.decode(z / scale), io["small.decoded"], atol, rtol
        )
        # 3 latent frames: more than one decoder chunk on a newer core
        report["info"]["node.whole_vs_chunked.decoded_3_latent_frames_max_abs"] = float(
            (fixed_model.decode(tiled_z / scale) - chunks.first_stage_model.decode(tiled_z / scale)).abs().max()
        )
        shape = (1, 16, 33, 24, 42)  # 256px 16:9 129 frames
        report["info"]["decode_memory_estimate_gib"] = {
            "original": vae.memory_used_decode(shape, torch.bfloat16) / 2**30,
            "node_whole_video": fixed.memory_used_decode(shape, torch.bfloat16) / 2**30,
            "node_chunked": chunks.memory_used_decode(shape, torch.bfloat16) / 2**30,
        }

        # the original VAE object after the node ran: untouched, still the unmasked core
        after = (model.encode(x) * scale, model.decode(z / scale), vae.encode(images) * scale)
        original_tiled = vae.encode_tiled(tiled_images, **tile_args) * scale
        original_tiled_decoded = vae.decode_tiled(tiled_z / scale, **latent_tile_args)
        check["original_after_node.small.latent"] = compare(after[0], z, atol, rtol)
        check["original_after_node.small.decoded"] = compare(after[1], io["small.decoded"], atol, rtol)
        check["original_after_node.wrapper.small.latent"] = compare(after[2], z, atol, rtol)
        fixed_parameters = dict(fixed_model.named_parameters())
        original_parameters = dict(model.named_parameters())
        report["node"] = {
            "original_unchanged_bitwise": all(bool(torch.equal(a, b)) for a, b in zip(after, unmasked_small)),
            "original_attention_functions_kept": [a.optimized_attention is o for a, o in zip(attentions, originals)],
            "original_modules_kept": model.encoder.mid.attn_1 is attentions[0]
            and model.decoder.mid.attn_1 is attentions[1],
            "original_chunks_kept": all(getattr(m, "carried", False) for m in chunked),
            "fixed_attention_function": [
                fixed_model.encoder.mid.attn_1.optimized_attention.__name__,
                fixed_model.decoder.mid.attn_1.optimized_attention.__name__,
            ],
            # the fix reaches core's tiled paths (3 latent frames per tile here); the original's stay unmasked
            "tiled_latent_moved_by_fix": float((fixed_tiled - original_tiled).abs().max()),
            "tiled_decoded_moved_by_fix": float((fixed_tiled_decoded - original_tiled_decoded).abs().max()),
            "fixed_is_a_new_object": fixed is not vae and fixed_model is not model,
            "parameter_names_equal": sorted(fixed_parameters) == sorted(original_parameters),
            "parameters_shared": all(fixed_parameters[k] is p for k, p in original_parameters.items()),
            "buffers_shared": all(a is b for a, b in zip(fixed_model.buffers(), model.buffers(), strict=True)),
            "parameter_count": len(original_parameters),
            "patcher_is_new": fixed.patcher is not vae.patcher,
            "patcher_is_clone": bool(fixed.patcher.is_clone(vae.patcher)),
            "attributes_kept": all(
                getattr(fixed, name) == getattr(vae, name)
                for name in ("latent_dim", "latent_channels", "upscale_index_formula", "downscale_index_formula")
            ),
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", nargs="?", type=Path, default=DEFAULT_CASE, help="hunyuan_vae_roundtrip case folder")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    case = args.case.resolve()
    json_path = args.json.resolve() if args.json else None
    boot_comfy()
    report = verify(case)
    for name, result in report["compare"].items():
        status = "ok  " if result["passed"] else "DIFF"
        print(f"{status} {name}: max_abs={result.get('max_abs', float('nan')):.3g} {result.get('detail', '')}")
    for name, value in report["info"].items():
        print(f"info {name}: {value}")
    print("load:", json.dumps(report["load"]))
    print("node:", json.dumps(report["node"]))
    if json_path:
        json_path.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
