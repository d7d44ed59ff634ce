"""Timestep schedules: exact parity with the reference table, plus the refusals and edge cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from opensora_lib.fixtures import run_path
from opensora_lib.schedules import (
    rflow_timesteps,
    temporal_factor_v1,
    timestep_transform_v1,
    v2_shift_alpha,
    v2_timesteps,
)

TABLE = Path(__file__).parent / "fixtures" / "opensora" / "schedules.json"


@pytest.fixture(scope="module")
def table() -> dict:
    return json.loads(TABLE.read_text())


def test_schedule_table_passes_exactly():
    comparisons = run_path(TABLE)
    assert len(comparisons) >= 12
    failed = [(c.name, c.max_abs, c.detail) for c in comparisons if not c.passed]
    assert not failed
    assert all(c.atol == 0 for c in comparisons if "entries" in c.name)


def test_v13_720p_matches_documented_tail():
    # OPENSORA.md A.6.2: 1.3, 720p, 113 frames, 30 steps ends 524, 415, 255 (ratio 9.92).
    t = rflow_timesteps(30, 720, 1280, 113, "1.3")
    assert t.dtype == torch.float32 and t.shape == (30,)
    assert t[0] == 1000
    assert [round(v) for v in t[-3:].tolist()] == [524, 415, 255]


def test_bf16_inputs_change_schedule_like_reference(table):
    entry = next(e for e in table["v1.3"] if e["width"] == 1110 and e["num_frames"] == 113 and e["num_steps"] == 30)
    fp32 = rflow_timesteps(30, 832, 1110, 113, "1.3")
    bf16 = rflow_timesteps(30, 832, 1110, 113, "1.3", bf16_inputs=True)
    assert torch.equal(fp32, torch.tensor(entry["t"], dtype=torch.float32))
    assert torch.equal(bf16, torch.tensor(entry["t_bf16_inputs"], dtype=torch.float32))
    assert (bf16 - fp32).abs().max() > 0.1


def test_small_image_first_step_is_not_exactly_1000(table):
    # Ratio < 1: the reference lands slightly off 1000 (this matters for the mask-strategy test).
    entry = next(e for e in table["v1.2"] if e["height"] == 64 and e["num_frames"] == 1 and e["num_steps"] == 1)
    assert rflow_timesteps(1, 64, 96, 1, "1.2").item() == entry["t"][0] != 1000.0
    assert rflow_timesteps(1, 64, 96, 1, "1.2", bf16_inputs=True).item() == entry["t_bf16_inputs"][0]


@pytest.mark.parametrize("frames", [2, 8, 16])
def test_v12_short_clips_are_refused(frames):
    with pytest.raises(ValueError, match=r"num_frames >= 17"):
        rflow_timesteps(30, 240, 426, frames, "1.2")
    with pytest.raises(ValueError, match=r"1\.2"):
        timestep_transform_v1(torch.tensor([1000.0]), 240, 426, frames, "1.2")


@pytest.mark.parametrize("frames", [2, 3, 4])
def test_v13_too_short_clips_are_refused(frames):
    with pytest.raises(ValueError, match=r"num_frames >= 5"):
        rflow_timesteps(30, 240, 426, frames, "1.3")


def test_temporal_factor():
    assert temporal_factor_v1(1, "1.2") == temporal_factor_v1(1, "1.3") == 1
    assert temporal_factor_v1(51, "1.2") == 15 and temporal_factor_v1(34, "1.2") == 10
    assert temporal_factor_v1(113, "1.3") == 28 and temporal_factor_v1(17, "1.3") == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(version="2.0"), "allowed: 1.2, 1.3"),
        (dict(num_steps=0), "num_steps"),
        (dict(num_frames=0), "num_frames"),
        (dict(height=0), "height and width"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    args = dict(num_steps=10, height=240, width=426, num_frames=51, version="1.2") | kwargs
    with pytest.raises(ValueError, match=message):
        rflow_timesteps(**args)


def test_no_transform_is_linear():
    t = rflow_timesteps(4, 720, 1280, 113, "1.3", use_timestep_transform=False)
    assert t.tolist() == [1000.0, 750.0, 500.0, 250.0]


def test_transform_is_identity_at_ratio_one():
    t = torch.tensor([1000.0, 731.0, 250.0, 1.0])
    assert torch.allclose(timestep_transform_v1(t, 512, 512, 1, "1.3"), t, atol=1e-4, rtol=0)


def test_v2_alpha_and_schedule():
    # OPENSORA.md B.5 examples.
    assert math.isclose(v2_shift_alpha(252, 33), 5.73, abs_tol=0.01)
    assert math.isclose(v2_shift_alpha(2304, 33), 11.87, abs_tol=0.01)
    assert math.isclose(v2_shift_alpha(256, 1), 1.0, abs_tol=1e-12)
    t = v2_timesteps(12, 252, 33)
    assert t.shape == (13,) and t.dtype == torch.float32
    assert t[0] == 1 and t[-1] == 0 and bool((t[1:] < t[:-1]).all())
    assert torch.equal(v2_timesteps(12, 252, 33, shift=False), torch.linspace(1, 0, 13))
    assert torch.equal(v2_timesteps(12, 9999, 7, shift_alpha=3.0), v2_timesteps(12, 1, 1, shift_alpha=3.0))
    with pytest.raises(ValueError, match="tokens_per_frame"):
        v2_shift_alpha(0, 3)
    with pytest.raises(ValueError, match="num_steps"):
        v2_timesteps(0, 252, 33)
