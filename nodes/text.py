"""Prompt encoding: Open-Sora's prompt text rules, T5 (and CLIP-L for 2.0) -> native CONDITIONING."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.model_management
import torch

from ..opensora_lib import prompts
from ..opensora_lib.conditioning_v1 import MAX_LOOPS
from .common import CATEGORY

log = logging.getLogger("OpenSora")

CAMERA_MOTIONS = ["none", "pan right", "pan left", "tilt up", "tilt down", "zoom in", "zoom out", "static"]


@dataclass
class Encoders:
    """Loaded encoder weights and their ModelPatchers. One instance serves every TextEncoder loaded from the same
    files with the same settings: 1.2 and 1.3 read the T5 alike, so their loaders share one copy."""

    t5: object
    t5_patcher: object
    clip: object = None
    clip_patcher: object = None

    def encode_t5(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        comfy.model_management.load_models_gpu([self.t5_patcher])
        y, mask, truncated = self.t5.encode(texts)
        if truncated:
            log.warning(
                "OpenSora: %d prompt(s) longer than %d T5 tokens were truncated, as the official code does",
                truncated,
                self.t5.max_length,
            )
        device = comfy.model_management.intermediate_device()
        return y.float().to(device), mask.to(device)

    def encode_clip(self, texts: list[str]) -> torch.Tensor:
        comfy.model_management.load_models_gpu([self.clip_patcher])
        pooled, truncated = self.clip.encode(texts)
        if truncated:
            log.warning(
                "OpenSora: %d prompt(s) longer than %d CLIP-L tokens were truncated for the pooled vector, as the "
                "official code does (T5 reads up to 512)",
                truncated,
                self.clip.max_length,
            )
        return pooled.float().to(comfy.model_management.intermediate_device())


@dataclass
class TextEncoder:
    """What flows along an OPENSORA_TEXT_ENCODER link: the prompts' Open-Sora version and the encoders."""

    version: str
    encoders: Encoders

    @property
    def patcher(self):
        """The T5's (the large one), as core's CLIP has: 0.33's RAM-pressure cache frees an old output with a
        ModelPatcher `patcher` first and takes anything else for a few bytes."""
        return self.encoders.t5_patcher

    def get_models(self) -> list:
        """Every ModelPatcher this holds (core's prompt model tracker reads it)."""
        return [p for p in (self.encoders.t5_patcher, self.encoders.clip_patcher) if p is not None]


def text_conditioning(encoder: TextEncoder, text: str) -> list:
    """One prompt as native CONDITIONING in the layout the Open-Sora model wrappers read."""
    if encoder.version == "2.0":
        t5, _ = encoder.encoders.encode_t5([text])
        pooled = encoder.encoders.encode_clip([text])
        return [[t5[:, 0], {"pooled_output": pooled, "opensora_version": "2.0", "opensora_text": text}]]
    y, mask = encoder.encoders.encode_t5([text])
    return [[y[:, 0], {"attention_mask": mask, "opensora_version": encoder.version, "opensora_text": text}]]


def loop_texts(encoder: TextEncoder, texts: list[str], first: list) -> list[dict]:
    """The T5 states of 1.x loops 0, 1, ... (the official "|k|" prompt segments), each text encoded once; loop 0 is
    the CONDITIONING entry `first` itself (the Sampler checks that nothing changed it since)."""
    cond, meta = first
    encoded = {texts[0]: {"cond": cond, "attention_mask": meta["attention_mask"], "opensora_text": texts[0]}}
    for text in texts:
        if text not in encoded:
            y, mask = encoder.encoders.encode_t5([text])
            encoded[text] = {"cond": y[:, 0], "attention_mask": mask, "opensora_text": text}
    return [encoded[text] for text in texts]


def null_conditioning(version: str) -> list:
    """1.x without a negative prompt: the DiT's learned null caption, masked by the positive prompt (Q1)."""
    return [[torch.zeros(1, 1, 1), {"opensora_null_caption": True, "opensora_version": version}]]


class OpenSoraEncodePrompt:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": ("OPENSORA_TEXT_ENCODER", {"tooltip": "From Load Open-Sora Text Encoder."}),
                "prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "What the video shows. Cleaned and suffixed exactly as the official code does for the encoder's version.",
                    },
                ),
                "negative_prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "What to avoid. Empty: 1.x uses the model's learned null caption (the official default), 2.0 encodes the empty string.",
                    },
                ),
            },
            "optional": {
                "aesthetic_score": (
                    "FLOAT",
                    {
                        "default": 6.5,
                        "min": -1.0,
                        "max": 10.0,
                        "step": 0.1,
                        "tooltip": "1.x aesthetic score added to the prompt (1.2 as a number, 1.3 as words). -1: none. Official configs: 6.5 (1.2), none (1.3 t2v), 7.0 (1.3 i2v).",
                    },
                ),
                "motion_score": (
                    "FLOAT",
                    {
                        "default": -1.0,
                        "min": -1.0,
                        "max": 100.0,
                        "step": 0.1,
                        "tooltip": "1.x motion (optical-flow) score added to the prompt. -1: none.",
                    },
                ),
                "camera_motion": (
                    CAMERA_MOTIONS,
                    {"default": "none", "tooltip": "1.x camera motion text added to the prompt."},
                ),
                "motion_score_v2": (
                    "INT",
                    {
                        "default": 4,
                        "min": 1,
                        "max": 15,
                        "tooltip": "2.0 motion score appended as ' N motion score.' (official default 4).",
                    },
                ),
                "fps": (
                    "INT",
                    {
                        "default": 24,
                        "min": 1,
                        "max": 120,
                        "tooltip": "2.0: frames per second written into the prompt (' 24 FPS.'); keep it equal to the saved video's fps.",
                    },
                ),
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "encode"
    CATEGORY = f"{CATEGORY}/conditioning"
    DESCRIPTION = "Encode a prompt and a negative prompt with Open-Sora's text rules into native CONDITIONING."

    def encode(
        self,
        text_encoder,
        prompt,
        negative_prompt,
        aesthetic_score=6.5,
        motion_score=-1.0,
        camera_motion="none",
        motion_score_v2=4,
        fps=24,
    ):
        if not prompt.strip():
            raise ValueError("The prompt is empty: describe the video to generate.")
        version = text_encoder.version
        if version == "2.0":
            positive = text_conditioning(
                text_encoder, prompts.prompt_text_v2(prompt, fps=fps, motion_score=motion_score_v2)
            )
            return (positive, text_conditioning(text_encoder, negative_prompt))
        loop_count = prompts.loop_count_v1(prompt)
        texts = prompts.prompt_loops_v1(
            prompt,
            version,
            aes=None if aesthetic_score < 0 else aesthetic_score,
            flow=None if motion_score < 0 else motion_score,
            camera_motion=None if camera_motion == "none" else camera_motion,
            loops=min(loop_count, MAX_LOOPS),
        )
        for unused in prompts.unused_prompt_parts_v1(prompt):
            log.warning("OpenSora: Encode Prompt does not use %s", unused)
        positive = text_conditioning(text_encoder, texts[0])
        if len(texts) > 1:
            positive[0][1]["opensora_loop_texts"] = loop_texts(text_encoder, texts, positive[0])
            if loop_count > MAX_LOOPS:
                log.warning(
                    "OpenSora: Encode Prompt encodes loop segments up to loop %d (the Sampler's most)", MAX_LOOPS - 1
                )
            log.info(
                "OpenSora: Encode Prompt encoded the prompt's |k| loop segments for the Open-Sora Sampler's loops "
                "(loop %d on uses the last); one video, the Guider and KSampler use loop 0's text %r",
                len(texts) - 1,
                texts[0],
            )
        if negative_prompt.strip():
            negative = text_conditioning(text_encoder, prompts.negative_prompt_text_v1(negative_prompt))
            if note := prompts.dropped_cjk(negative_prompt):
                log.warning("OpenSora: Encode Prompt's negative prompt loses %s", note)
        else:
            negative = null_conditioning(version)
        return (positive, negative)


NODE_CLASS_MAPPINGS = {"OpenSoraEncodePrompt": OpenSoraEncodePrompt}
NODE_DISPLAY_NAME_MAPPINGS = {"OpenSoraEncodePrompt": "Open-Sora Encode Prompt"}
