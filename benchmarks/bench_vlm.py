"""Masked-layer attention time vs dense SDPA, side by side in one run (issue 4, item 6).

One decoder layer's attention core of LLaVA-OneVision-0.5B's language model (Qwen2: 14 query heads of 64,
2 key/value heads) on MIMIC's layout: 20 prefix text tokens, N images of 729 tokens with one text token
between images, 30 suffix tokens. For each batch size and N it times

    dense       transformers' sdpa_attention_forward with is_causal (what an unmasked layer runs)
    fast        stitchkit's masked kernel as a model runs it: on CUDA one varlen flash call over the
                layout's segments + one call for the late text queries
    grouped     the same kernel's other executor (the CPU one; on CUDA as a comparison): one causal SDPA
                call per distinct segment length + the late text call
    dense_mask  the official code's way: SDPA with the explicit (B, 1, S, S) boolean mask

forward and forward+backward, and reports the kept fraction of query-key pairs (mimic.md §7) and the
target fast <= 1.5 x kept x dense. On CUDA: N = 2, 4, 8, 16, batch 1 and 8, bf16. On CPU: a small fp32
version (N = 2, 4 of 64 tokens) that checks the wiring and the ratios' direction, plus the FLOPs table.

Run: `python -m benchmarks vlm` (picks CUDA when present).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch
from rich.console import Console
from rich.table import Table

from stitchkit.vlm.attention import (
    VisionLayout,
    attention_core_flops,
    block_diagonal_attention,
    causal_pairs,
    layout_pairs,
    masked_pairs,
    policy_attention,
)
from stitchkit.vlm.spans import ImageSpan

PREFIX, SUFFIX = 20, 30
HEADS, KV_HEADS, HEAD_DIM = 14, 2, 64


def mimic_layout(batch: int, n_images: int, image_tokens: int) -> tuple[VisionLayout, int]:
    """Images first: P text tokens, then N blocks separated by one text token, then Q text tokens."""
    spans, position = [], PREFIX
    for _ in range(n_images):
        spans.append(ImageSpan(position, position + image_tokens, (position, position + image_tokens)))
        position += image_tokens + 1
    seq_len = position - 1 + SUFFIX
    return VisionLayout.build([spans] * batch, seq_len, frozenset({0})), seq_len


def _timer(device: torch.device):
    if device.type == "cuda":

        def timed(fn, iters: int) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / iters / 1000

        return timed

    def timed_cpu(fn, iters: int) -> float:
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters

    return timed_cpu


def measure(batch: int, n_images: int, image_tokens: int, heads: int, kv_heads: int, head_dim: int, dtype, device, iters: int):
    layout, seq = mimic_layout(batch, n_images, image_tokens)
    layout = layout.to(device)
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    scaling = head_dim**-0.5
    generator = torch.Generator(device=device).manual_seed(0)
    # (B, H, S, d) views of (B, S, H, d) tensors, as transformers' attention modules produce them.
    make = lambda h: torch.randn(batch, seq, h, head_dim, device=device, dtype=dtype, generator=generator).transpose(1, 2)  # noqa: E731
    q, k, v = make(heads), make(kv_heads), make(kv_heads)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def dense(q, k, v):
        return sdpa_attention_forward(module, q, k, v, None, scaling=scaling)[0]

    def fast(q, k, v):
        return block_diagonal_attention(q, k, v, None, layout, scaling, 0.0, None, {})

    def grouped(q, k, v):
        return block_diagonal_attention(q, k, v, None, layout, scaling, 0.0, None, {}, executor="grouped")

    def dense_mask(q, k, v):
        return policy_attention(module, q, k, v, None, base="sdpa", vision_layout=_with_kernel(layout, "dense_mask"), scaling=scaling)[0]

    timed = _timer(device)
    grad_out = torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype, generator=generator)
    results, errors = {}, {}
    reference = dense_mask(q, k, v).float()
    kernels = {"dense": dense, "fast": fast, "grouped": grouped, "dense_mask": dense_mask}
    if device.type != "cuda":  # fast is grouped there
        del kernels["grouped"]
    for name, fn in kernels.items():
        with torch.no_grad():
            for _ in range(2):
                fn(q, k, v)
            forward = timed(lambda: fn(q, k, v), iters)
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

        def step():
            fn(qg, kg, vg).backward(grad_out)

        for _ in range(2):
            step()
        results[name] = (forward, timed(step, iters))
        if name in ("fast", "grouped"):
            with torch.no_grad():
                errors[name] = float((fn(q, k, v).float() - reference).abs().max())
    dense_pairs, kept_pairs = layout_pairs(layout)
    return seq, kept_pairs / dense_pairs, results, errors


def _with_kernel(layout: VisionLayout, kernel: str) -> VisionLayout:
    from dataclasses import replace

    return replace(layout, kernel=kernel)


def flops_table(console: Console) -> None:
    table = Table(title="allowed query-key pairs, P=20 + N x 730 + Q=30 tokens (mimic.md §7); d = 896 (0.5B)")
    for column in ("N", "S", "kept E_m / E_c", "reduction per masked layer", "model-wide (12 of 24 masked)", "attention GFLOPs dense -> masked"):
        table.add_column(column, justify="right")
    for n in (2, 4, 5, 6, 8, 10, 16):
        seq = PREFIX + n * 730 + SUFFIX
        dense, masked = causal_pairs(seq), masked_pairs(PREFIX, n, 730, SUFFIX)
        kept = masked / dense
        table.add_row(
            str(n), str(seq), f"{kept:.3f}", f"{100 * (1 - kept):.1f}%", f"{100 * (1 - kept) / 2:.1f}%",
            f"{attention_core_flops(dense, 896) / 1e9:.2f} -> {attention_core_flops(masked, 896) / 1e9:.2f}",
        )  # fmt: skip
    console.print(table)


def main(quick: bool = False) -> list[dict]:
    console = Console(width=220)
    flops_table(console)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        settings = dict(image_tokens=729, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=torch.bfloat16, iters=10)
        grid = [(b, n) for b in (1, 8) for n in (2, 4, 8, 16)]
        title = f"masked-layer attention vs dense SDPA on {torch.cuda.get_device_name()}, bf16, 729 tokens per image, 14 heads of 64 (2 KV)"
    else:
        torch.set_num_threads(1)  # small ops on a shared CPU: threads spin-waiting for each other swamp the timings
        settings = dict(image_tokens=64, heads=4, kv_heads=2, head_dim=32, dtype=torch.float32, iters=3)
        grid = [(1, 2), (1, 4)] if not quick else [(1, 2)]
        title = "masked-layer attention vs dense SDPA on CPU (small: 64 tokens per image, 4 heads of 32, fp32)"
    table = Table(title=title)
    kernels = ("fast", "grouped", "dense_mask") if cuda else ("fast", "dense_mask")
    columns = ["batch", "images", "S", "kept", "dense fwd ms", *(f"{k} fwd ms" for k in kernels), "fast/dense fwd",
               "dense f+b ms", *(f"{k} f+b ms" for k in kernels), "fast/dense f+b", "target 1.5 x kept",
               *(f"max |{k} - mask|" for k in kernels[:-1])]  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    rows = []
    for batch, n_images in grid:
        seq, kept, results, errors = measure(batch, n_images, device=device, **settings)
        rows.append(dict(batch=batch, images=n_images, seq_len=seq, kept=kept, **{f"{k}_error": e for k, e in errors.items()},
                         **{f"{k}_{m}_ms": 1000 * v[i] for k, v in results.items() for i, m in enumerate(("fwd", "fwdbwd"))}))  # fmt: skip
        ms = lambda s: f"{1000 * s:.2f}"  # noqa: E731
        (d_f, d_b), (f_f, f_b) = results["dense"], results["fast"]
        table.add_row(
            str(batch), str(n_images), str(seq), f"{kept:.3f}", ms(d_f), *(ms(results[k][0]) for k in kernels),
            f"{f_f / d_f:.2f}", ms(d_b), *(ms(results[k][1]) for k in kernels), f"{f_b / d_b:.2f}", f"{1.5 * kept:.2f}",
            *(f"{errors[k]:.1e}" for k in kernels[:-1]),
        )  # fmt: skip
    console.print(table)
    return rows


if __name__ == "__main__":
    main()
