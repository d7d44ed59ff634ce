"""Open-Sora 2.0 MMDiT: golden forward parity, checkpoint layout, operations seam, config switches, bf16."""

from types import SimpleNamespace

import pytest
import torch
from helpers_mmdit import random_blocks
from helpers_torch import no_grad, one_thread  # noqa: F401 (autouse fixtures)
from torch import nn

from opensora_lib import mmdit as mmdit_module
from opensora_lib import mmdit_layers, norms
from opensora_lib.fixtures.mmdit_cases import build_model
from opensora_lib.fixtures.runner import load_case, run_path
from opensora_lib.mmdit import MMDiT, MMDiTConfig, mmdit_v2_config, mmdit_v2_dcae_config
from opensora_lib.mmdit_layers import RMS_NORM_EPS, RMSNorm, SingleStreamBlock, rotary_tables

CASE = "mmdit_v2_forward"


@pytest.fixture(scope="module")
def case(fixtures_dir):
    return load_case(fixtures_dir / CASE)


def forward_inputs(case) -> dict:
    names = ("img", "img_ids", "txt", "txt_ids", "timesteps", "y_vec", "cond")
    return {name: case.tensor(name) for name in names}


def test_golden_forward_passes(fixtures_dir):
    comparisons = run_path(fixtures_dir / CASE)
    names = {c.name for c in comparisons}
    assert {"out", "inter.pe.0", "inter.pe.1", "inter.single_blocks.1", "inter.double_blocks.1.0"} <= names
    failed = [(c.name, c.max_abs, c.detail) for c in comparisons if not c.passed]
    assert not failed
    out = next(c for c in comparisons if c.name == "out")
    assert out.max_abs < 1e-5


def expected_v2_keys(in_channels: int, patch: int) -> dict[str, tuple[int, ...]]:
    """The Open_Sora_v2 checkpoint layout (OPENSORA.md B.4), written out independently of the model code."""
    hidden, mlp, head = 3072, 12288, 128
    keys = {}

    def linear(name, out_features, in_features):
        keys[f"{name}.weight"] = (out_features, in_features)
        keys[f"{name}.bias"] = (out_features,)

    linear("img_in", hidden, in_channels)
    linear("time_in.in_layer", hidden, 256)
    linear("time_in.out_layer", hidden, hidden)
    linear("vector_in.in_layer", hidden, 768)
    linear("vector_in.out_layer", hidden, hidden)
    linear("cond_in", hidden, in_channels + patch * patch)
    linear("txt_in", hidden, 4096)
    for i in range(19):
        for stream in ("img", "txt"):
            prefix = f"double_blocks.{i}.{stream}"
            linear(f"{prefix}_mod.lin", 6 * hidden, hidden)
            for proj in ("q_proj", "k_proj", "v_proj", "proj"):
                linear(f"{prefix}_attn.{proj}", hidden, hidden)
            keys[f"{prefix}_attn.norm.query_norm.scale"] = (head,)
            keys[f"{prefix}_attn.norm.key_norm.scale"] = (head,)
            linear(f"{prefix}_mlp.0", mlp, hidden)
            linear(f"{prefix}_mlp.2", hidden, mlp)
    for i in range(38):
        prefix = f"single_blocks.{i}"
        linear(f"{prefix}.q_proj", hidden, hidden)
        linear(f"{prefix}.k_proj", hidden, hidden)
        linear(f"{prefix}.v_mlp", hidden + mlp, hidden)
        linear(f"{prefix}.linear2", hidden, hidden + mlp)
        keys[f"{prefix}.norm.query_norm.scale"] = (head,)
        keys[f"{prefix}.norm.key_norm.scale"] = (head,)
        linear(f"{prefix}.modulation.lin", 3 * hidden, hidden)
    linear("final_layer.linear", in_channels, hidden)
    linear("final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    return keys


@pytest.mark.parametrize(
    "config_fn, in_channels, patch, params",
    [(mmdit_v2_config, 64, 2, 11_891_390_528), (mmdit_v2_dcae_config, 128, 1, None)],
)
def test_full_size_meta_state_dict_matches_checkpoint_layout(config_fn, in_channels, patch, params):
    model = MMDiT(config_fn(), dtype=torch.bfloat16, device="meta")
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = expected_v2_keys(in_channels, patch)
    assert len(actual) == 1082
    assert set(actual) == set(expected), sorted(set(actual) ^ set(expected))[:10]
    assert actual == expected
    assert all(v.dtype == torch.bfloat16 and v.is_meta for v in model.state_dict().values())
    if params is not None:
        assert sum(p.numel() for p in model.parameters()) == params


def test_operations_seam_builds_every_linear():
    class CountingLinear(nn.Linear):
        built = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            CountingLinear.built += 1

    operations = SimpleNamespace(Linear=CountingLinear, LayerNorm=nn.LayerNorm, Conv2d=nn.Conv2d)
    model = MMDiT(mmdit_v2_config(), device="meta", operations=operations)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, CountingLinear) for m in linears)
    assert CountingLinear.built == len(linears) == 7 + 19 * 2 * 7 + 38 * 5 + 2


def test_config_from_dict_and_errors(case):
    config = MMDiTConfig.from_dict(dict(case.meta["model_config"], from_pretrained="x.safetensors", cache_dir=None))
    assert config.out_channels == config.in_channels == 64 and config.use_liger_rope and not config.fused_qkv
    v2 = mmdit_v2_config()
    assert (v2.depth, v2.depth_single_blocks, v2.hidden_size, v2.num_heads, v2.axes_dim) == (
        19,
        38,
        3072,
        24,
        [16, 56, 56],
    )
    with pytest.raises(ValueError, match="unknown MMDiTConfig field.*hidden_dim"):
        MMDiTConfig.from_dict(dict(case.meta["model_config"], hidden_dim=3))
    with pytest.raises(ValueError, match="missing required field.*depth"):
        MMDiTConfig.from_dict({k: v for k, v in case.meta["model_config"].items() if k != "depth"})
    with pytest.raises(ValueError, match="axes_dim .* must sum to the head dim 64"):
        MMDiTConfig.from_dict(dict(case.meta["model_config"], axes_dim=[8, 28, 30]))


def test_forward_input_errors(case):
    model = build_model(case)
    inputs = forward_inputs(case)
    with pytest.raises(ValueError, match="cond_embed: pass cond"):
        model(**dict(inputs, cond=None))
    with pytest.raises(ValueError, match=r"img must be packed tokens \[B, L, 64\]"):
        model(**dict(inputs, img=inputs["img"][..., :32]))
    with pytest.raises(ValueError, match="timesteps must be"):
        model(**dict(inputs, timesteps=inputs["timesteps"][:1]))


def test_rope_tables_once_per_forward_and_shared_ids(case, monkeypatch):
    model = build_model(case)
    inputs = forward_inputs(case)
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return rotary_tables(*args, **kwargs)

    monkeypatch.setattr(mmdit_module, "rotary_tables", counting)
    full = model(**inputs)
    assert len(calls) == 1
    # Position ids given once for the whole batch give the same result.
    shared = model(**dict(inputs, img_ids=inputs["img_ids"][:1], txt_ids=inputs["txt_ids"][:1]))
    assert torch.equal(full, shared)
    assert torch.allclose(full, case.tensor("out"), atol=5e-5, rtol=1e-4)


def test_interleaved_rope_is_the_half_split_rope_on_permuted_dims():
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (2, 11, 3)).float()
    axes, head_dim = [8, 28, 28], 64
    half = rotary_tables(ids, axes, 10000, half_split=True)
    inter = rotary_tables(ids, axes, 10000, half_split=False)
    x = torch.randn(2, 11, 3, head_dim)
    # Interleaved pair (2j, 2j+1) is half-split pair (j, j + D/2).
    perm = torch.stack((torch.arange(head_dim // 2), torch.arange(head_dim // 2) + head_dim // 2), -1).flatten()
    assert torch.allclose(inter.apply(x[..., perm]), half.apply(x)[..., perm], atol=1e-5)
    assert not torch.allclose(inter.apply(x), half.apply(x), atol=1e-2)  # the layouts really differ (Q25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_and_rms_norm_are_the_float32_formulas(dtype, monkeypatch):
    """The eager RoPE (products rounded straight into x's dtype) and RMSNorm (F.rms_norm) give exactly what the
    plain upcast formulas give: rotate in float32, then cast; normalise in float32, cast, then multiply by the gain
    (Liger's "llama" casting)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (2, 11, 3)).float()
    tables = rotary_tables(ids, [8, 28, 28], 10000, half_split=True)
    x = (3 * torch.randn(2, 11, 3, 64)).to(dtype)
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = tables.cos, tables.sin
    expected = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(dtype)
    rotated = tables.apply(x)
    assert rotated.dtype == dtype and torch.equal(rotated, expected)

    # autograd cannot go through the out= form (LoRA training, gradient guidance): the plain form runs instead
    with torch.enable_grad():
        needs_grad = x.clone().requires_grad_(dtype != torch.float16)  # CPU fp16 backward is not the point here
        if needs_grad.requires_grad:
            rotated_with_grad = tables.apply(needs_grad)
            rotated_with_grad.float().sum().backward()
            assert torch.equal(rotated_with_grad.detach(), expected) and needs_grad.grad is not None
    with pytest.raises(ValueError, match="RoPE tables for batch 2 cannot rotate a batch of 1"):
        tables.apply(x[:1])

    norm = RMSNorm(64, dtype=dtype)
    nn.init.normal_(norm.scale)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_NORM_EPS)).to(dtype)
    assert torch.equal(norm(x), normed * norm.scale)
    # torch < 2.5 (no F.rms_norm upcast): the spelled-out formula gives the same
    monkeypatch.setattr(norms, "FUSED_RMS_NORM", False)
    assert torch.equal(norm(x), normed * norm.scale)


@pytest.mark.parametrize("fused_qkv", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_blocks_writing_into_buffers_are_bit_identical_to_the_plain_forms(dtype, fused_qkv, monkeypatch):
    """Eagerly a double block's RoPE writes txt and img straight into one joint q / k and its MLPs run GELU in place,
    and a single block builds linear2's input over its v + MLP projection: the same values, bit for bit, as
    cat-then-rotate, the GELU module and cat(attn, gelu)."""
    case = random_blocks(dtype, fused_qkv=fused_qkv)
    buffered = case.run()
    monkeypatch.setattr(mmdit_layers, "eager_out_allowed", lambda *tensors: False)
    plain = case.run()
    for got, expected in zip(buffered, plain):
        assert got.dtype == dtype and torch.equal(got, expected)
    assert not torch.equal(buffered[0], case.img)  # the blocks did something


def test_joint_rope_checks_lengths_and_keeps_autograd():
    torch.manual_seed(0)
    pe = rotary_tables(torch.randint(0, 9, (1, 7, 3)).float(), [8, 12, 12], 10000)
    txt, img = torch.randn(1, 3, 2, 32), torch.randn(1, 4, 2, 32)
    joint = pe.apply_joint((txt, img))
    assert torch.equal(joint, pe.apply(torch.cat((txt, img), 1)))
    mixed = pe.apply_joint((txt.bfloat16(), img))  # promoted as the concatenation would be
    assert mixed.dtype == torch.float32 and torch.equal(mixed, pe.apply(torch.cat((txt.bfloat16(), img), 1)))
    with pytest.raises(ValueError, match="RoPE tables for 7 tokens cannot rotate 4 tokens"):
        pe.apply(img)
    # Gradient guidance: only the image part needs a gradient; the buffered form must not be taken.
    with torch.enable_grad():
        img_grad = img.clone().requires_grad_()
        assert not mmdit_layers.eager_out_allowed(txt, img_grad)
        rotated = pe.apply_joint((txt, img_grad))
        rotated.sum().backward()
    assert torch.equal(rotated.detach(), joint) and img_grad.grad is not None


def test_single_block_trains_through_the_plain_forms():
    """LoRA training (core's TrainLoraNode) runs the blocks with gradients: the GELU is not written into a buffer
    then, and the weights get gradients equal in value to what the inference forward computes."""
    torch.manual_seed(0)
    block = SingleStreamBlock(64, 1, 4.0, fused_qkv=False)
    x, vec = torch.randn(1, 7, 64), torch.randn(1, 64)
    pe = rotary_tables(torch.randint(0, 9, (1, 7, 3)).float(), [16, 24, 24], 10000)
    inference = block(x, vec, pe)
    with torch.enable_grad():
        trained = block(x, vec, pe)
        trained.square().sum().backward()
    assert torch.equal(trained.detach(), inference)
    assert block.linear2.weight.grad is not None and block.v_mlp.weight.grad.abs().sum() > 0


def _fused_state_dict(split: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    fused = {}
    for key, value in split.items():
        for stream in ("img_attn", "txt_attn"):
            if f"{stream}.q_proj." in key:
                suffix = key.rsplit(".", 1)[1]
                base = key.split(f"{stream}.q_proj.")[0] + stream
                parts = [split[f"{base}.{p}.{suffix}"] for p in ("q_proj", "k_proj", "v_proj")]
                fused[f"{base}.qkv.{suffix}"] = torch.cat(parts)
        if key.startswith("single_blocks.") and ".q_proj." in key:
            base, suffix = key.split(".q_proj.")
            parts = [split[f"{base}.{p}.{suffix}"] for p in ("q_proj", "k_proj", "v_mlp")]
            fused[f"{base}.linear1.{suffix}"] = torch.cat(parts)
        if not any(p in key for p in ("q_proj", "k_proj", "v_proj", "v_mlp")):
            fused[key] = value
    return fused


def test_fused_qkv_switch_matches_split_layout(case):
    split_model = build_model(case)
    fused_model = MMDiT(dict(case.meta["model_config"], fused_qkv=True)).eval()
    fused_model.load_state_dict(_fused_state_dict(case.weights), strict=True)
    assert "single_blocks.0.linear1.weight" in fused_model.state_dict()
    inputs = forward_inputs(case)
    assert torch.allclose(fused_model(**inputs), split_model(**inputs), atol=1e-5, rtol=1e-5)


def test_guidance_embed_switch(case):
    torch.manual_seed(0)
    model = MMDiT(dict(case.meta["model_config"], guidance_embed=True)).eval()
    assert "guidance_in.in_layer.weight" in model.state_dict()
    inputs = forward_inputs(case)
    with pytest.raises(ValueError, match="guidance_embed"):
        model(**inputs)
    a = model(**inputs, guidance=torch.full((2,), 4.0))
    b = model(**inputs, guidance=torch.full((2,), 1.0))
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


def test_bf16_forward_smoke(case):
    reference = build_model(case)(**forward_inputs(case))
    model = MMDiT(case.meta["model_config"], dtype=torch.bfloat16).eval()
    model.load_state_dict(case.weights, strict=True)
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    inputs = {k: v.to(torch.bfloat16) for k, v in forward_inputs(case).items()}
    out = model(**inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # bf16 times (as the reference's bf16 run) are rounded before x1000: a different embedding, so only
    # float32 times are expected to stay close to the float32 output.
    out = model(**dict(inputs, timesteps=forward_inputs(case)["timesteps"]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    relative = (out.float() - reference).norm() / reference.norm()
    assert relative < 0.03, relative
