"""opensora_lib.attention: backend selection, errors, the CPU fallbacks and mask handling."""

import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers_mmdit import random_blocks

from opensora_lib import attention


@pytest.fixture(autouse=True)
def restore_backend():
    previous = attention.get_backend()
    torch.set_grad_enabled(False)
    kernels, dtypes = attention._kernels, attention._kernel_dtypes
    yield
    # also undoes tests that force an unavailable backend
    attention._backend, attention._kernels, attention._kernel_dtypes = previous, kernels, dtypes
    attention._package.cache_clear()  # forget stand-in packages
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
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # None: the import fails, as when it is not installed
    attention._package.cache_clear()
    with pytest.raises(
        ValueError,
        match=r"'flash_attn' does not import \(flash_attn: ModuleNotFoundError: import of flash_attn halted.*\); "
        r"available: sdpa, math",
    ):
        attention.set_backend("flash_attn")


def test_selecting_a_backend_imports_only_its_own_package(monkeypatch):
    """A broken optional package (sageattention, flash_attn) must not be imported when another backend is picked."""
    looked_up = []
    monkeypatch.setattr(attention, "_package", lambda name: looked_up.append(name) or fake_flash_attn())
    attention.set_backend("sdpa")
    attention.set_backend("math")
    assert looked_up == []
    attention.set_backend("flash_attn_3")
    assert set(looked_up) == {"flash_attn_3"}


@pytest.mark.parametrize("backend", ["cudnn", "flash_attn", "flash_attn_3", "sageattention"])
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
    for backend in ("sdpa", "math", "cudnn", "flash_attn", "flash_attn_3"):
        attention._backend = backend
        out = attention.attention(q, k, v, mask=mask)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=f"{backend} with a {kind} mask")
    attention._backend = "sdpa"
    unmasked = attention.attention(q, k, v)
    assert (unmasked[0] - expected[0]).abs().max() > 1e-3  # the mask changed sample 0


@pytest.mark.parametrize("has_priority", [True, False])
def test_cudnn_kernels_prefer_cudnn_and_fall_back_only_where_torch_can(monkeypatch, has_priority):
    """torch >= 2.6 (set_priority): cuDNN first, the other kernels after it for shapes cuDNN rejects; older torch:
    cuDNN alone."""
    calls = []
    monkeypatch.setattr(attention, "sdpa_kernel", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setattr(attention, "_HAS_PRIORITY", has_priority)
    attention._cudnn_kernels()
    (args, kwargs), cudnn = calls[0], torch.nn.attention.SDPBackend.CUDNN_ATTENTION
    if has_priority:
        assert args[0][0] == cudnn and len(args[0]) > 1 and kwargs == {"set_priority": True}
    else:
        assert args == ([cudnn],) and kwargs == {}


def call(device="cuda", dtype=torch.bfloat16, head_dim=128):
    """What _kernel_takes looks at, without a GPU."""
    return SimpleNamespace(device=torch.device(device), dtype=dtype, shape=(1, 24, 100, head_dim))


def test_the_cuda_kernels_take_only_unmasked_half_precision_cuda_calls():
    assert attention._kernel_takes(call(), None)
    assert attention._kernel_takes(call(dtype=torch.float16), None)
    assert attention._kernel_takes(call(head_dim=72), None)  # STDiT3's heads
    assert not attention._kernel_takes(call(dtype=torch.float32), None)  # FA2 / FA3 / cuDNN / Sage: no float32
    assert not attention._kernel_takes(call(), torch.ones(1, dtype=torch.bool))
    assert not attention._kernel_takes(call("cpu"), None)
    assert not attention._kernel_takes(call(head_dim=512), None)  # the 1.2 VAE's single 512-wide head
    assert not attention._kernel_takes(call(head_dim=100), None)  # not a multiple of 8


@pytest.mark.parametrize("fp16_disabled", [True, False])
def test_an_fa3_build_without_fp16_kernels_sends_fp16_to_sdpa(fp16_disabled, monkeypatch):
    """fa3-fwd is built with FLASHATTENTION_DISABLE_FP16 (its fa3_fwd_config says so): fp16 weights with
    flash_attn_3 must run sdpa instead of raising "This flash attention build does not support FP16" mid-sampling."""
    fake = fake_flash_attn()
    fake.__name__ = "fa3_fwd_interface"
    config = ModuleType("fa3_fwd_config")
    config.CONFIG = {"build_flags": {"FLASHATTENTION_DISABLE_FP16": fp16_disabled}}
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", fake)
    monkeypatch.setitem(sys.modules, "fa3_fwd_config", config)
    attention._package.cache_clear()
    attention.set_backend("flash_attn_3")
    assert attention._kernel_takes(call(dtype=torch.bfloat16), None)
    assert attention._kernel_takes(call(dtype=torch.float16), None) is not fp16_disabled
    attention.set_backend("sdpa")
    assert attention._kernel_dtypes == (torch.bfloat16, torch.float16)  # the next selection starts afresh


@pytest.mark.parametrize(("capability", "offered"), [((9, 0), True), ((8, 6), True), ((12, 0), False)])
def test_fa3_is_offered_on_ampere_and_hopper_only(capability, offered, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fake_flash_attn())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    attention._package.cache_clear()
    assert ("flash_attn_3" in attention.available_backends()) is offered
    if offered:
        attention.set_backend("flash_attn_3")
    else:
        with pytest.raises(ValueError, match="kernels for Ampere and Hopper GPUs only, and this one is sm_120"):
            attention.set_backend("flash_attn_3")


def fake_flash_attn(returns_lse: bool = False):
    """A stand-in FlashAttention module: flash_attn_func takes and returns [batch, tokens, heads, head_dim] (the
    layout FA2 and FA3 use), computed by SDPA; it records the calls and refuses another layout."""
    module = ModuleType("fake_flash")
    module.calls = []

    def flash_attn_func(q, k, v):
        assert q.dim() == 4 and q.stride(-1) == 1, "flash kernels need a contiguous last dimension"
        assert q.shape[2] == k.shape[2] == v.shape[2] and q.shape[3] == k.shape[3], "heads in dim 2"
        module.calls.append(tuple(q.shape))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2)
        return (out, torch.zeros(q.shape[0], q.shape[2], q.shape[1])) if returns_lse else out

    module.flash_attn_func = flash_attn_func
    return module


@pytest.mark.parametrize("module_name", ["flash_attn_interface", "fa3_fwd_interface"])
def test_flash_attn_3_is_found_under_either_module(module_name, monkeypatch):
    for name in attention._PACKAGES["flash_attn_3"]:
        monkeypatch.setitem(sys.modules, name, None)  # None: the import fails, as when it is not installed
    attention._package.cache_clear()
    assert "flash_attn_3" not in attention.available_backends()
    with pytest.raises(
        ValueError, match=r"'flash_attn_3' does not import \(flash_attn_interface: .*; fa3_fwd_interface: "
    ):
        attention.set_backend("flash_attn_3")
    monkeypatch.setitem(sys.modules, module_name, fake_flash_attn())
    attention._package.cache_clear()
    assert "flash_attn_3" in attention.available_backends()
    attention.set_backend("flash_attn_3")
    assert attention._package("flash_attn_3") is attention._kernels is sys.modules[module_name]
    attention.set_backend("sdpa")
    assert attention._kernels is None


@pytest.mark.parametrize("returns_lse", [False, True])
def test_flash_attn_3_gets_tokens_before_heads_and_returns_heads_first(returns_lse, monkeypatch):
    """The FA3 path's layout, on the CPU with a stand-in kernel: the same values as SDPA, in [B, heads, L, D]."""
    fake = fake_flash_attn(returns_lse)
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", fake)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    monkeypatch.setattr(attention, "_kernel_takes", lambda q, mask: mask is None)  # as if on CUDA
    attention._package.cache_clear()
    attention.set_backend("flash_attn_3")
    q, k, v = qkv(batch=2, heads=3, q_len=5, k_len=7, dim=16)
    out = attention.attention(q, k, v)
    assert fake.calls == [(2, 5, 3, 16)]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-6)


def test_mmdit_blocks_through_flash_attn_3_match_sdpa(monkeypatch):
    """The MMDiT's joint attention (q / k / v views of [B, L, heads, D]) through the FA3 path gives the SDPA
    blocks' outputs: one call per block, with every joint token."""
    case = random_blocks(torch.float32)
    attention.set_backend("sdpa")
    expected = case.run()
    fake = fake_flash_attn()
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fake)
    monkeypatch.setattr(attention, "_kernel_takes", lambda q, mask: mask is None)
    attention._package.cache_clear()
    attention.set_backend("flash_attn_3")
    out = case.run()
    assert fake.calls == [(2, 14, 2, 64)] * 2  # the double and the single block: 5 text + 9 image tokens
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_package_that_fails_to_import_says_why(monkeypatch):
    """An installed kernel built for another torch fails on import (e.g. an undefined symbol): the loader's error
    names the module and the import error, not just "not installed"."""

    def broken(name, *args, **kwargs):
        if name == "flash_attn":
            raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")
        return real_import(name, *args, **kwargs)

    real_import = attention.importlib.import_module
    monkeypatch.setattr(attention.importlib, "import_module", broken)
    attention._package.cache_clear()
    with pytest.raises(
        ValueError,
        match="'flash_attn' does not import \\(flash_attn: ImportError: flash_attn_2_cuda.so: undefined symbol",
    ):
        attention.set_backend("flash_attn")


def test_flash_attn_3_compiles_without_a_graph_break(monkeypatch):
    """Under torch.compile (core's TorchCompileModel) the FA3 call must not split the graph: the package is looked
    up when the backend is selected, not in the traced call. fullgraph=True raises on any break."""
    fake = fake_flash_attn()
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fake)
    monkeypatch.setattr(attention, "_kernel_takes", lambda q, mask: mask is None)
    attention._package.cache_clear()
    attention.set_backend("flash_attn_3")
    q, k, v = qkv()
    torch._dynamo.reset()
    compiled = torch.compile(attention.attention, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-6)
    assert fake.calls  # traced through the stand-in kernel


def test_a_hosted_backend_is_listed_selected_and_takes_every_call(monkeypatch):
    """The node layer registers "comfy" (ComfyUI's attention); the library calls it for masked and CPU calls too."""
    seen = []

    def host(q, k, v, mask):
        seen.append(mask is not None)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask) + 1

    monkeypatch.setattr(attention, "_hosted", {"host": host})
    assert attention.backend_names()[-1] == "host" and "host" in attention.available_backends()
    attention.set_backend("host")
    q, k, v = qkv()
    keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    torch.testing.assert_close(attention.attention(q, k, v, mask=keep), F.scaled_dot_product_attention(q, k, v) + 1)
    attention.attention(q, k, v)
    assert seen == [True, False]
    with pytest.raises(ValueError, match="unknown attention backend 'comfy'.*sageattention, cudnn, host"):
        attention.set_backend("comfy")
