#!/usr/bin/env bash
# Copy the few files of the official Open-Sora 2.0 code that benchmarks/official_mmdit.py runs (the MMDiT
# forward and the I2V denoiser) from a local git mirror into the git-ignored folder .official/.
# The official code is never committed here; it is only imported at run time, side by side with ours.
#
#   bash scripts/fetch_official.sh                    # mirror /work/.mirror/hpcaitech+Open-Sora/repo, ref main
#   OPENSORA_MIRROR=/path/to/Open-Sora OPENSORA_REF=<commit> bash scripts/fetch_official.sh [DEST]
#   bash scripts/fetch_official.sh --wheels           # also download the GPU session's wheels into .whl/
#
# --wheels (needs PyPI): the wheels the GPU machine lacks, for Python 3.12 x86-64, without their dependencies
# (torch, triton, numpy, scipy are there): liger_kernel==0.5.2 (the official code's RoPE / RMSNorm kernels),
# torchsde==0.2.6 + trampoline==0.1.2 (imported by ComfyUI's k-diffusion, for bench_comfy_memory) and
# fa3-fwd==0.0.3 (FlashAttention-3's forward kernels, 27.6 MB, built against torch's stable ABI from 2.10 and CUDA
# 13: the flash_attn_3 attention backend of the GPU session's step 3; a binary, so its sha256 is checked). Its 105 MB
# library is deflated to 27.6 MB in the wheel but xz takes it to ~9 MB, so it travels unpacked as
# .whl/fa3_fwd-0.0.3.tar.xz (what pip install --target would write) and keeps the device call under 64 MiB.
# benchmarks/gpu_session.sh installs whatever is in .whl/ (git-ignored; carried to the GPU machine).
# --wheels also packs the pinned ComfyUI host (.cache/comfyui-0.3.75, from scripts/setup.sh) into
# .whl/comfyui-host.tar.gz: ~7 MB instead of ~24 MB carried, which keeps the device call under its 64 MiB limit;
# gpu_session.sh unpacks it to /tmp when .cache/comfyui-0.3.75 is not there.
#
# Package __init__ files other than mmdit's are left out on purpose: they would import every model family
# (and ColossalAI); the folders then load as namespace packages. official_mmdit.py stubs what the copied
# files import but the benchmark never calls (checkpoint loading, text encoders, datasets, ColossalAI).
set -euo pipefail

cd "$(dirname "$0")/.."
WHEELS=(liger_kernel==0.5.2 torchsde==0.2.6 trampoline==0.1.2 fa3-fwd==0.0.3)
FA3_WHEEL=fa3_fwd-0.0.3-cp39-abi3-manylinux_2_24_x86_64.whl
FA3_SHA256=44d26c6cfc69dde5a0f9c6bebbccbb96ed20e97bc8b9ddda638b0bf62e91b93d
if [[ ${1:-} == --wheels ]]; then
    shift
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    if ! echo "$FA3_SHA256  .whl/$FA3_WHEEL" | sha256sum --check --quiet; then
        rm -f ".whl/$FA3_WHEEL"
        echo "fetch_official: .whl/$FA3_WHEEL is not the wheel this script was written for (sha256); removed" >&2
        exit 1
    fi
    unpacked=$(mktemp -d)
    python3 -m zipfile -e ".whl/$FA3_WHEEL" "$unpacked"
    tar -cJf .whl/fa3_fwd-0.0.3.tar.xz -C "$unpacked" .
    rm -rf "$unpacked" ".whl/$FA3_WHEEL"
    if [[ -d .cache/comfyui-0.3.75 ]]; then
        tar czf .whl/comfyui-host.tar.gz --exclude=__pycache__ -C .cache comfyui-0.3.75
    else
        echo "WARNING: no .cache/comfyui-0.3.75 (run scripts/setup.sh): the GPU session skips the memory benchmark" >&2
    fi
fi
MIRROR=${OPENSORA_MIRROR:-/work/.mirror/hpcaitech+Open-Sora/repo}
REF=${OPENSORA_REF:-main}
DEST=${1:-.official}
FILES=(
    opensora/models/mmdit/__init__.py   # from .model import Flux
    opensora/models/mmdit/model.py      # MMDiTModel, MMDiTConfig
    opensora/models/mmdit/layers.py     # blocks, Liger RMSNorm, compiled timestep embedding
    opensora/models/mmdit/math.py       # flash-attn attention, Liger RoPE
    opensora/acceleration/checkpoint.py # auto_grad_checkpoint (a plain call at inference)
    opensora/registry.py                # MODELS (mmengine Registry)
    opensora/utils/sampling.py          # I2VDenoiser, get_schedule, pack / unpack
    opensora/utils/inference.py         # SamplingMethod, prepare_inference_condition
    opensora/datasets/aspect.py         # get_image_size (imported by sampling / inference)
)

if ! git -C "$MIRROR" rev-parse --verify --quiet "$REF^{commit}" >/dev/null; then
    echo "fetch_official: no git mirror with ref '$REF' at $MIRROR (set OPENSORA_MIRROR / OPENSORA_REF)" >&2
    exit 1
fi
commit=$(git -C "$MIRROR" rev-parse "$REF^{commit}")
rm -rf "$DEST"
mkdir -p "$DEST"
git -C "$MIRROR" archive --format=tar "$commit" -- "${FILES[@]}" | tar -x -C "$DEST"
echo "$commit" >"$DEST/COMMIT"
echo "fetch_official: ${#FILES[@]} files of $REF ($commit) -> $DEST ($(du -sh "$DEST" | cut -f1))"
