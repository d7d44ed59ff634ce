"""Pure-PyTorch Open-Sora 1.2 / 1.3 / 2.0 inference library. Never imports ComfyUI."""
