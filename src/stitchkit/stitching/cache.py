"""Frozen-model features computed once and shared by every objective, stitch layer and seed (issue 3, item 8).

The source prefix R_src^n, the target's own stitch-point state R_tgt^m (LFM, learnable-prefix init, least
squares) and its match-layer features (FFM) depend only on a frozen model and an image, never on S. So a sweep
computes them once per (model, split) in one pass through the model, for every layer it will need, and every
cell reads them back. Storage is half precision (float16 by default; float32 on request), in memory or as .npy memory maps on
disk (`mode='disk'`, for sets larger than RAM; finished files survive a killed run and are reused).

Keys name what is stored:
    'h{k}'      HF hidden_states[k]: the embeddings (k = 0) or block k's raw output, all tokens
    'normed'    the final norm of the last block, all tokens (the default FFM match layer)
    'readout'   what a task head reads: pooled output (classification) or normed patch tokens (segmentation)
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from stitchkit.errors import InputError
from stitchkit.progress import track
from stitchkit.stitching.model import readout

CacheMode = Literal["memory", "disk"]


def layer_key(k: int) -> str:
    return f"h{k}"


def match_key(end: int, normed: bool) -> str:
    """The key of a match layer (objectives.resolve_match_layer's output)."""
    return "normed" if normed else layer_key(end)


def inference_autocast(device) -> torch.autocast:
    """bf16 autocast on a GPU (frozen blocks run in bf16 there, spec §7); a no-op on the CPU."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class FeatureArray:
    """One output array in the storage dtype, filled batch by batch: in memory, or a .npy memory map written to a
    temporary file. Filled in place, so a set of features never exists in float32 as a whole (nor twice)."""

    def __init__(self, path: Path | None, length: int, row_shape: tuple[int, ...], dtype: np.dtype, what: str):
        self.path, self.what = path, what
        if path is None:
            self.array = np.empty((length, *row_shape), dtype=dtype)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = path.with_name(f".{path.name}.partial")
            self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=dtype, shape=(length, *row_shape))

    def write(self, start: int, rows: torch.Tensor) -> None:
        """Store one batch of rows at `start`, cast to the storage dtype."""
        stored = rows.float().cpu().numpy().astype(self.array.dtype)
        if not np.isfinite(stored).all():
            # float16 tops out at 65504; a few ViTs have activations beyond that.
            raise InputError(f"{self.what} overflow {self.array.dtype}; set cache_dtype: float32")
        self.array[start : start + len(stored)] = stored

    def finish(self) -> np.ndarray:
        if self.path is None:
            return self.array
        self.array.flush()
        del self.array
        self.tmp.replace(self.path)  # only a complete file ever has the final name
        return np.load(self.path, mmap_mode="r")


def layer_depth(keys) -> int:
    """How many blocks must run to produce these keys."""
    keys = set(keys)
    depths = [int(k[1:]) for k in keys if re.fullmatch(r"h\d+", k)]
    return max(depths, default=0) if not {"normed", "readout"} & keys else None


@torch.no_grad()
def batch_features(backbone, px, keys, task: str) -> dict[str, torch.Tensor]:
    """The requested keys for one batch of pixels, running only as many blocks as the deepest key needs."""
    tokens, ctx = backbone.embed(px)
    deepest = layer_depth(keys)
    deepest = backbone.num_blocks if deepest is None else deepest
    states = {0: tokens}
    for k in range(deepest):
        tokens = backbone.call_block(backbone.blocks[k], tokens, ctx)
        states[k + 1] = tokens
    out = {}
    for key in keys:
        if key == "normed":
            out[key] = backbone.final_norm(tokens)
        elif key == "readout":
            out[key] = readout(backbone, tokens, task)
        else:
            out[key] = states[int(key[1:])]
    return out


def compute_features(
    backbone,
    images: np.ndarray,
    keys: list[str],
    task: str,
    batch_size: int = 64,
    device=None,
    dtype: str = "float16",
    paths: dict[str, Path] | None = None,
) -> dict[str, np.ndarray]:
    """One pass of `backbone` over `images` (N, H, W, 3) uint8, returning the requested keys as arrays.

    `paths` (key -> .npy path) writes memory maps instead of keeping arrays in memory.
    """
    device = torch.device(device or backbone.device)
    outputs: dict[str, FeatureArray] = {}
    model_type = backbone.model.config.model_type
    for start in track(range(0, len(images), batch_size), f"features of {model_type}"):
        px = backbone.preprocess(images[start : start + batch_size]).to(device)
        with inference_autocast(device):
            values = batch_features(backbone, px, keys, task)
        for key, value in values.items():
            if key not in outputs:
                path = paths.get(key) if paths else None
                what = f"{model_type} features at {key}"
                outputs[key] = FeatureArray(path, len(images), tuple(value.shape[1:]), np.dtype(dtype), what)
            outputs[key].write(start, value)
    return {key: output.finish() for key, output in outputs.items()}


class FeatureStore:
    """Features of named frozen models on named image splits, computed on first use, planned ahead.

    `plan(model, split, keys)` registers what a sweep will need; the first `get` for a (model, split) then
    computes every planned key in one pass, so a model with six stitch points is run once, not six times.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        mode: CacheMode = "memory",
        batch_size: int = 64,
        device=None,
        dtype: str = "float16",
    ):
        if mode == "disk" and root is None:
            raise ValueError("a disk cache needs a root folder")
        self.root, self.mode, self.batch_size, self.device = Path(root) if root else None, mode, batch_size, device
        self.dtype = dtype
        self._planned: dict[tuple[str, str], set[str]] = defaultdict(set)
        self._memory: dict[tuple[str, str, str], np.ndarray] = {}
        self.computed_passes = 0  # how many model passes were run (the benchmark and tests read this)

    @classmethod
    def for_run(cls, run_root: Path, cfg, device) -> "FeatureStore":
        """The store a sweep or tree run asks for with its `cache`, `cache_dtype` and `eval_batch_size` settings
        (disk: under run_root/cache)."""
        disk = cfg.cache == "disk"
        return cls(run_root / "cache" if disk else None, mode="disk" if disk else "memory",
                   batch_size=cfg.eval_batch_size, device=device, dtype=cfg.cache_dtype)  # fmt: skip

    def plan(self, model: str, split: str, keys) -> None:
        self._planned[(model, split)].update(keys)

    def _path(self, model: str, split: str, key: str) -> Path:
        return self.root / model / split / f"{key}.npy"

    def _stored(self, model: str, split: str, key: str) -> np.ndarray | None:
        if (model, split, key) in self._memory:
            return self._memory[(model, split, key)]
        if self.mode == "disk" and self._path(model, split, key).exists():
            array = np.load(self._path(model, split, key), mmap_mode="r")
            self._memory[(model, split, key)] = array
            return array
        return None

    def get(self, model: str, split: str, key: str, backbone, images: np.ndarray, task: str) -> np.ndarray:
        """The stored array for (model, split, key); computes it (and everything else planned) if missing."""
        found = self._stored(model, split, key)
        if found is not None:
            return found
        wanted = sorted(k for k in self._planned[(model, split)] | {key} if self._stored(model, split, k) is None)
        paths = {k: self._path(model, split, k) for k in wanted} if self.mode == "disk" else None
        arrays = compute_features(backbone, images, wanted, task, self.batch_size, self.device, self.dtype, paths)
        self.computed_passes += 1
        self._memory.update({(model, split, k): array for k, array in arrays.items()})
        return self._memory[(model, split, key)]


def float_tensor(rows, device=None) -> torch.Tensor:
    """Cached rows (float16 array or memory-map slice) as a float32 tensor on `device`."""
    return torch.from_numpy(np.array(rows, dtype=np.float32)).to(device)


class ArrayDataset(torch.utils.data.Dataset):
    """Rows of several equally long arrays (cached features in float16, labels) as dicts of tensors.

    Features stay in half precision until the training step casts them on the device: half the host memory
    and half the host-to-device traffic.
    """

    def __init__(self, **arrays):
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"arrays of different lengths: { {k: len(a) for k, a in arrays.items()} }")
        self.arrays = arrays
        self.length = lengths.pop()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        # np.array copies: rows of a read-only memory map must not become tensors that alias it.
        return {name: torch.from_numpy(np.array(array[index])) for name, array in self.arrays.items()}
