"""Stitching throughput: the feature cache on CPU, and stitch-step efficiency at ViT-L size on a GPU.

    .venv/bin/python -m benchmarks.bench_stitch           # CPU: micro zoo, with vs without the cache
    .venv/bin/python -m benchmarks.bench_stitch --gpu     # GPU: ViT-L stitch step, fraction of matmul peak

CPU part (issue 3, item 8): one small sweep (FFM->TLT, MLP stitch, three stitch points) run twice side by
side, once reading the frozen source prefix (and FFM targets) from the cache and once recomputing them every
step; examples/s counts training examples over the whole wall time, cache building included.

GPU part: random-init DINOv2-L (24 blocks, width 1024, 16x16 patches + CLS = 257 tokens), bf16 frozen weights,
an fp32 MLP stitch under bf16 autocast, and the FFM loss. One step = S forward, target blocks n+1..24 forward,
input-gradient backward through them (their weights are frozen, so no weight gradients), AdamW on S.
Model FLOPs per step: per tail block 2 x linear (forward + input gradient) + 3 x attention (forward, and
backward's two products per forward product), plus 3 x the stitch's FLOPs; divided by the measured time and by
the measured bf16 matmul peak (a large square matmul). "recompute" adds the source prefix (blocks 1..n,
forward, no grad) to every step, which is what the cache saves.
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


# ---- CPU: the cache on the micro zoo ------------------------------------------------------------


def cpu_cache_benchmark(quick: bool = False, repeats: int = 2) -> list[dict]:
    from stitchkit.config import validate_config
    from stitchkit.stitching.config import StitchRunConfig
    from stitchkit.stitching.protocol import Sweep

    images = 256 if quick else 1024
    base = {
        "data": {"image_size": 32, "train": images, "val": 64, "test": 64},
        "models": {"dino": "zoo:dino", "clip": "zoo:clip"},
        "pairs": [["dino", "clip"]],
        "points": [2, 4, 5],
        "objectives": ["ffm_tlt"],
        "self_stitch": False,
        "probes": False,
        "ffm": {"epochs": 1, "batch_size": 64},
        "tlt": {"epochs": 2, "batch_size": 64},
        "device": "cpu",
    }
    Sweep(validate_config(StitchRunConfig, base), tempfile.mkdtemp())  # builds the zoo models if needed
    seconds = {"memory": [], "none": []}
    # Alternating order, best of `repeats`: one-time costs and load from other processes fall on neither side.
    for _ in range(repeats):
        for cache in seconds:
            cfg = validate_config(StitchRunConfig, {**base, "cache": cache})
            with tempfile.TemporaryDirectory() as out:
                started = time.perf_counter()
                cells = Sweep(cfg, out).run_all()["cells"]
                seconds[cache].append(time.perf_counter() - started)
    examples = len(cells) * images * (1 + 2)  # FFM 1 epoch + TLT 2 epochs per cell
    rows = [{"cache": c, "seconds": min(s), "examples_per_s": examples / min(s)} for c, s in seconds.items()]
    print(f"micro zoo dino->clip, FFM->TLT, MLP stitch, points 2/4/5, {images} images, CPU ({torch.get_num_threads()} threads):")
    for row in rows:
        print(f"  cache={row['cache']:<7} {row['seconds']:7.2f} s  {row['examples_per_s']:8.1f} examples/s (cache building included)")
    print(f"  speed-up from the cache: {rows[1]['seconds'] / rows[0]['seconds']:.2f}x")
    return rows


# ---- GPU: ViT-L stitch step ---------------------------------------------------------------------


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak(size: int = 8192, repeats: int = 50, device: str = "cuda") -> float:
    """Measured bf16 matmul FLOP/s of this GPU (the denominator of every efficiency figure)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def step_flops(batch: int, tokens: int, width: int, mlp: int, tail_blocks: int) -> float:
    linear = 2 * batch * tokens * (4 * width * width + 2 * width * mlp)
    attention = 2 * 2 * batch * tokens * tokens * width
    stitch = 2 * batch * tokens * (width * width + width * width)
    return tail_blocks * (2 * linear + 3 * attention) + 3 * stitch


def time_call(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_stitch_step(backbone, point, variant, hidden, reference, pixels, weights, repeats) -> tuple[float, float]:
    """Median seconds of one MLP-stitch FFM training step from cached activations at `point`, and of the same
    step recomputing the source prefix from pixels. The model and optimiser die with this frame, so the next
    variant's peak memory does not count them."""
    from stitchkit.stitching.layers import build_stitch
    from stitchkit.stitching.model import StitchedModel
    from stitchkit.stitching.objectives import final_feature_matching_loss

    device, width = hidden.device.type, hidden.shape[-1]
    torch.manual_seed(0)
    stitched = StitchedModel(backbone, backbone, point, build_stitch("mlp", width, width)).to(device)
    optimizer = torch.optim.AdamW([p for p in stitched.parameters() if p.requires_grad], lr=1e-4, fused=device == "cuda")
    loss_of = lambda h, r: final_feature_matching_loss(stitched(h, output="match"), r, weights)  # noqa: E731
    prefix_of = stitched.source_hidden
    if variant.startswith("compile"):
        mode = variant.partition(":")[2] or None
        loss_of = torch.compile(loss_of, mode=mode)
        prefix_of = torch.compile(prefix_of, mode=mode)

    def step(h=hidden):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = loss_of(h, reference)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def recompute_step():
        with torch.autocast(device, dtype=torch.bfloat16):
            h = prefix_of(pixels)
        step(h)

    return time_call(step, warmup=3, repeats=repeats), time_call(recompute_step, warmup=3, repeats=repeats)


def gpu_vitl_benchmark(
    points=(2, 14, 22), batch: int = 128, variants=("eager", "compile"), repeats: int = 10, smoke_test: bool = False
) -> dict:
    """smoke_test: a tiny model on the CPU, to check the code path without a GPU."""
    import transformers as hf

    from stitchkit.backbones import load_backbone
    from stitchkit.stitching.model import readout_token_weights

    torch.manual_seed(0)
    device = "cpu" if smoke_test else "cuda"
    width, mlp, blocks, heads, image = (32, 64, 24, 2, 28) if smoke_test else (1024, 4096, 24, 16, 224)
    config = hf.Dinov2Config(
        hidden_size=width, num_hidden_layers=blocks, num_attention_heads=heads, intermediate_size=mlp, image_size=image, patch_size=14
    )
    backbone = load_backbone(hf.Dinov2Model(config).eval(), dtype=torch.bfloat16, device=device)
    tokens = 1 + (image // 14) ** 2
    peak = matmul_peak(256 if smoke_test else 8192, device=device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{name}: measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)
    results = {"device": name, "peak_tflops": peak / 1e12, "batch": batch, "tokens": tokens, "rows": []}
    weights = readout_token_weights(backbone).to(device)
    for point in points:
        hidden = torch.randn(batch, tokens, width, device=device, dtype=torch.bfloat16)
        reference = torch.randn(batch, tokens, width, device=device, dtype=torch.bfloat16)
        pixels = torch.randn(batch, 3, image, image, device=device, dtype=torch.bfloat16)
        for variant in variants:
            try:
                cached, recompute = time_stitch_step(backbone, point, variant, hidden, reference, pixels, weights, repeats)
            except Exception as err:  # a compile mode this torch/GPU cannot do: report it, keep going
                print(f"  n={point:2d} {variant}: failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
                continue
            flops = step_flops(batch, tokens, width, mlp, blocks - point)
            row = {
                "point": point,
                "variant": variant,
                "step_ms": cached * 1e3,
                "tflops": flops / cached / 1e12,
                "fraction_of_peak": flops / cached / peak,
                "recompute_step_ms": recompute * 1e3,
                "speedup_from_cache": recompute / cached,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            }
            results["rows"].append(row)
            print(
                f"  n={point:2d} {variant:<28} step {row['step_ms']:7.1f} ms  {row['tflops']:6.1f} TFLOP/s  "
                f"{row['fraction_of_peak']:6.1%} of peak   recompute {row['recompute_step_ms']:7.1f} ms  "
                f"cache speed-up {row['speedup_from_cache']:.2f}x",
                flush=True,
            )
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the ViT-L stitch-step efficiency benchmark (needs CUDA)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--variants", default="eager,compile,compile:max-autotune-no-cudagraphs")
    parser.add_argument("--json", type=Path, help="write the GPU results here")
    parser.add_argument("--smoke-test", action="store_true", help="run the GPU code path on a tiny CPU model")
    # `python -m benchmarks` calls main() with no arguments: the CPU benchmark.
    args = parser.parse_args(argv or [])
    if args.gpu or args.smoke_test:
        results = gpu_vitl_benchmark(
            batch=args.batch, variants=tuple(args.variants.split(",")), smoke_test=args.smoke_test, repeats=2 if args.smoke_test else 10
        )
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    else:
        cpu_cache_benchmark(quick=args.quick)


if __name__ == "__main__":
    main(sys.argv[1:])
