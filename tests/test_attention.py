"""opensora_lib.attention: backend selection, errors, the CPU fallbacks and mask handling."""

import pytest
import torch
import torch.nn.functional as F

from opensora_lib import attention


@pytest.fixture(autouse=True)
def restore_backend():
    previous = attention.get_backend()
    torch.set_grad_enabled(False)
    yield
    attention._backend = previous  # also undoes tests that force an unavailable backend
    torch.set_grad_enabled(True)


def qkv(batch=2, heads=3, q_len=5, k_len=7, dim=16, dtype=torch.float32):
    torch.manual_seed(0)
    return (
        torch.randn(batch, heads, q_len, dim, dtype=dtype),
        torch.randn(batch, heads, k_len, dim, dtype=dtype),
        torch.randn(batch, heads, k_len, dim, dtype=dtype),
    )


def test_sdpa_and_math_always_available():
    found = attention.available_backends()
    assert found[:2] == ["sdpa", "math"]
    assert set(found) <= set(attention.BACKENDS)
    for name in ("sdpa", "math"):
        attention.set_backend(name)
        assert attention.get_backend() == name


def test_cudnn_listed_only_with_cuda(monkeypatch):
    assert "cudnn" in attention.BACKENDS
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "cudnn" not in attention.available_backends()
    with pytest.raises(ValueError, match="'cudnn' needs CUDA"):
        attention.set_backend("cudnn")
    assert attention.get_backend() != "cudnn"  # a refused name leaves the selection as it was
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    assert "cudnn" in attention.available_backends()
    attention.set_backend("cudnn")
    assert attention.get_backend() == "cudnn"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'.*sdpa, math, flash_attn"):
        attention.set_backend("xformers")


def test_missing_package_is_explained(monkeypatch):
    monkeypatch.setattr(attention, "available_backends", lambda: ["sdpa", "math"])
    with pytest.raises(ValueError, match="'flash_attn' is not installed; available: sdpa, math"):
        attention.set_backend("flash_attn")


@pytest.mark.parametrize("backend", ["cudnn", "flash_attn", "sageattention"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_only_backends_fall_back_to_sdpa_bit_identically_on_cpu(backend, dtype):
    q, k, v = qkv(dtype=dtype)
    expected = F.scaled_dot_product_attention(q, k, v)
    attention._backend = backend  # as if selected on a CUDA machine, then given CPU tensors
    out = attention.attention(q, k, v)
    assert out.dtype == dtype
    assert torch.equal(out, expected)


def test_math_matches_sdpa():
    q, k, v = qkv()
    attention.set_backend("sdpa")
    reference = attention.attention(q, k, v)
    attention.set_backend("math")
    out = attention.attention(q, k, v)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert not torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks_are_honoured_by_sdpa_math_and_the_fallbacks(kind):
    q, k, v = qkv()
    keep = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    keep[0, :, :, 4:] = False  # sample 0 sees only its first 4 keys
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    # Reference: sample 0 attends to keys 0..3 only, sample 1 to all.
    first = F.scaled_dot_product_attention(q[:1], k[:1, :, :4], v[:1, :, :4])
    second = F.scaled_dot_product_attention(q[1:], k[1:], v[1:])
    expected = torch.cat((first, second))
    for backend in ("sdpa", "math", "cudnn", "flash_attn"):
        attention._backend = backend
        out = attention.attention(q, k, v, mask=mask)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=f"{backend} with a {kind} mask")
    attention._backend = "sdpa"
    unmasked = attention.attention(q, k, v)
    assert (unmasked[0] - expected[0]).abs().max() > 1e-3  # the mask changed sample 0


def test_cudnn_kernel_order_puts_cudnn_first():
    assert attention._CUDNN_ORDER[0] == torch.nn.attention.SDPBackend.CUDNN_ATTENTION
    assert attention._HAS_PRIORITY  # torch >= 2.6: a shape cuDNN rejects falls back instead of raising
