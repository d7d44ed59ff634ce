"""Weight memory and CPU encode time of the T5 encoder, its matrices kept packed as the file stores them against the
same file loaded dense (every tensor cast to the compute precision), per file format and precision.

Writes a T5-v1.1-XXL at the full width (d_model 4096, d_ff 10240, 64 heads, vocab 32128; fewer blocks, --blocks) as
safetensors files in fp16, fp8 (e4m3) and ComfyUI scaled fp8, and as a Q8_0 GGUF (the `gguf` package's writer, as
tests/helpers_gguf.py), loads each with opensora_lib.text_encoders.load_t5
(what Load Open-Sora Text Encoder runs) and densely, and reports per case:
- weights_gib (all parameters: the packed bytes, the embedding, the norms), and per block;
- seconds of one encode of one prompt at the version's length (1.x: 300 tokens with the mask, fp32; 2.0: 512, bf16),
  the median of --repeats, on the CPU threads torch is given (--threads);
- equal: whether the packed model's states equal the dense model's bit for bit.

    python benchmarks/bench_t5_memory.py [--blocks 2 --threads 2 --repeats 3] [out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from opensora_lib import checkpoint, packed_linear  # noqa: E402
from opensora_lib.text_encoders import load_t5  # noqa: E402

PRECISIONS = {"1.x fp32": (torch.float32, 300, True), "2.0 bf16": (torch.bfloat16, 512, False)}
FORMATS = ("fp16", "fp8", "fp8_scaled", "Q8_0")


def t5_config(blocks: int, width: int):
    from transformers import T5Config

    return T5Config(
        vocab_size=32128,
        d_model=width,
        d_kv=64,
        d_ff=width * 5 // 2,
        num_layers=blocks,
        num_heads=width // 64,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )


def write_files(folder: Path, blocks: int, width: int) -> dict[str, Path]:
    """The random T5 in each format, as ComfyUI's t5xxl files lay it out (a single file, the config inferred)."""
    from safetensors.torch import save_file
    from transformers import T5EncoderModel

    torch.manual_seed(0)
    model = T5EncoderModel(t5_config(blocks, width))
    state_dict = {k: v.detach().contiguous() for k, v in model.state_dict().items() if "embed_tokens" not in k}
    files = {}
    for name in FORMATS:
        if name == "Q8_0":
            sys.path.insert(0, str(REPO / "tests"))
            from helpers_gguf import write_gguf

            files[name] = folder / "t5xxl_Q8_0.gguf"
            write_gguf(files[name], state_dict, "Q8_0", arch="t5encoder")
            continue
        out = {}
        for key, tensor in state_dict.items():
            if name == "fp16" or tensor.ndim != 2:  # norms stay 16-bit in every format
                out[key] = tensor.half()
            elif name == "fp8" or key == "shared.weight":
                out[key] = tensor.to(torch.float8_e4m3fn)
            else:  # ComfyUI's scaled fp8: weight / scale in e4m3, the tensor-wise scale beside it
                scale = tensor.abs().max().float() / 448.0
                out[key], out[key.removesuffix("weight") + "scale_weight"] = (
                    (tensor / scale).to(torch.float8_e4m3fn),
                    scale,
                )
        if name == "fp8_scaled":
            out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
        files[name] = folder / f"t5xxl_{name}.safetensors"
        save_file(out, str(files[name]))
    return files


def dense_t5(path: Path, dtype: torch.dtype, blocks: int, width: int):
    """The file's tensors all cast to dtype, in an ordinary T5EncoderModel (how the loader worked before packing)."""
    from transformers import T5EncoderModel

    state_dict = checkpoint.load_state_dict(path, dtype=dtype)
    with torch.device("meta"):
        model = T5EncoderModel(t5_config(blocks, width))
    model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    return model.to(dtype).eval()


def encode_seconds(model, tokens: int, masked: bool, repeats: int) -> tuple[float, torch.Tensor]:
    ids = torch.randint(0, 32128, (1, tokens), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids) if masked else None
    times, states = [], None
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            states = model(input_ids=ids, attention_mask=mask).last_hidden_state
            times.append(time.perf_counter() - start)
    return statistics.median(times), states


def weights_gib(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--width", type=int, default=4096, help="d_model (4096: T5-XXL; smaller for a smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("out", nargs="?", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = write_files(Path(tmp), args.blocks, args.width)
        for fmt, path in files.items():
            for precision, (dtype, tokens, masked) in PRECISIONS.items():
                row = {"format": fmt, "precision": precision, "blocks": args.blocks}
                dense = dense_t5(path, dtype, args.blocks, args.width)
                row["dense_seconds"], expected = encode_seconds(dense, tokens, masked, args.repeats)
                row["dense_gib"] = weights_gib(dense)
                del dense
                kept = load_t5(path, dtype)
                row["packed_layers"] = len(packed_linear.packed_layers(kept))
                row["kept_seconds"], states = encode_seconds(kept, tokens, masked, args.repeats)
                row["kept_gib"] = weights_gib(kept)
                row["equal"] = bool(torch.equal(states, expected))
                embedding = kept.shared.weight.numel() * kept.shared.weight.element_size() / 2**30
                row["kept_gib_per_block"] = (row["kept_gib"] - embedding) / args.blocks
                row["dense_gib_per_block"] = (row["dense_gib"] - embedding) / args.blocks
                del kept
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| file | precision | weights per block, kept / dense (GiB) | encode s, kept / dense | equal |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['format']} | {r['precision']} | {r['kept_gib_per_block']:.3f} / {r['dense_gib_per_block']:.3f} | "
            f"{r['kept_seconds']:.2f} / {r['dense_seconds']:.2f} | {r['equal']} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
