"""Image loading and processing.

Loading refuses missing, corrupt, truncated and oversized files with an `ImageError` naming the
file. Processing follows Idefics2's finding that images should keep their aspect ratio: the long
side is resized to the encoder resolution and the rest padded with the normalisation mean (so the
padding is zero after normalisation), or (`native`) the image is resized within side bounds to a
multiple of the encoder's patch and encoded as it is, NaViT-style. `split_image` cuts an image
into a grid of crops plus the whole image: a fixed k x k grid (Idefics2), or a grid chosen per
image from its size and aspect ratio (`adaptive_grid`, LLaVA-UHD).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

# A truncated file must fail loudly, never decode as a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the reason."""


def load_image(path: str | Path, max_pixels: int = 64_000_000) -> Image.Image:
    """Open and fully decode an image as RGB, or raise `ImageError` naming `path`."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    return _decode(path, str(path), max_pixels)


def load_image_bytes(data: bytes, name: str, max_pixels: int = 64_000_000) -> Image.Image:
    """Decode an image held in memory (a parquet cell, a data URL); errors name `name`."""
    if not data:
        raise ImageError(f"{name}: empty image data")
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(source, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageError(f"{name}: image too large ({w}x{h} = {w * h} pixels > {max_pixels})")
                img.load()
                return img.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: image too large ({e})") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError… for bad files
        raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e


def resize_pad(img: Image.Image, size: int, fill: tuple[int, int, int]) -> Image.Image:
    """Resize so the long side is `size`, keeping the aspect ratio, and centre on a square canvas."""
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = img.resize((nw, nh), Image.BICUBIC) if (nw, nh) != (w, h) else img
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    return canvas


def expand_square(img: Image.Image, size: int, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's `expand2square`: pad to a square around the image first, then resize the
    square (bicubic); what `LlavaImageProcessor(do_pad=True)` does."""
    w, h = img.size
    if w != h:
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    return img.resize((size, size), Image.BICUBIC) if img.size != (size, size) else img


def resize_crop(img: Image.Image, size: int) -> Image.Image:
    """CLIP's preprocessing: resize the short side to `size` (bicubic), then centre-crop a square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def split_image(img: Image.Image, grid: tuple[int, int] = (2, 2)) -> list[Image.Image]:
    """Cut `img` into rows x cols crops (row-major) followed by the whole image."""
    rows, cols = grid
    w, h = img.size
    xs = [round(i * w / cols) for i in range(cols + 1)]
    ys = [round(j * h / rows) for j in range(rows + 1)]
    crops = [img.crop((xs[i], ys[j], xs[i + 1], ys[j + 1])) for j in range(rows) for i in range(cols)]
    return crops + [img]


def adaptive_grid(width: int, height: int, size: int, max_slices: int) -> tuple[int, int]:
    """LLaVA-UHD's slice grid (Guo et al. 2024, section 3.1): the ideal number of slices is the
    image's area in encoder squares, N = ceil(W * H / size^2), capped at `max_slices`; among the
    grids of N - 1, N or N + 1 slices (at most `max_slices`) the one whose slices are closest to
    square wins, i.e. whose cols / rows is closest to W / H in log scale (ties: the slice count
    nearest N, then fewer rows). Returns (rows, cols); (0, 0) when the image fits one square (N <= 1):
    it is then encoded whole, without slices."""
    n = min(math.ceil(width * height / (size * size)), max_slices)
    if n <= 1:
        return 0, 0
    aspect = math.log(width / height)
    grids = [
        (r, c)
        for k in (n - 1, n, n + 1)
        if 2 <= k <= max_slices
        for r in range(1, k + 1)
        for c in [k // r]
        if r * c == k
    ]
    return min(grids, key=lambda g: (abs(aspect - math.log(g[1] / g[0])), abs(g[0] * g[1] - n), g[0]))


def native_size(width: int, height: int, unit: int, min_side: int, max_side: int) -> tuple[int, int]:
    """The size an image is encoded at with `resize native` (Idefics2): its aspect ratio kept, the
    long side at most `max_side`, the short side at least `min_side` where the long side allows
    (never enlarged beyond that), each side rounded to a multiple of `unit` (the encoder's patch,
    or a conv tower's stride)."""
    long, short = max(width, height), min(width, height)
    scale = min(1.0, max_side / long)
    if short * scale < min_side:
        scale = min(min_side / short, max_side / long)
    snap = lambda x: max(unit, int(round(x * scale / unit)) * unit)  # noqa: E731
    return snap(width), snap(height)


@dataclass
class ImageProcessor:
    """Turns PIL images into normalised tensors with the encoder's own settings.

    Args:
        size: square input resolution of the encoder.
        mean: per-channel normalisation mean (0-1 scale).
        std: per-channel normalisation std.
        resize: `pad` (keep aspect: resize the long side, then pad), `expand` (keep aspect the way
            LLaVA-1.5 does: pad to a square, then resize), `squash` (ignore aspect) or `crop`
            (CLIP: resize the short side, centre-crop).
            `native` keeps the image's own aspect and resolution within `min_side`..`max_side`
            (sides multiples of `unit`): the encoder sees a non-square input.
        grid: fixed image splitting: 0 encodes the whole image only; k cuts it into k x k crops
            plus the whole image (`views` returns k*k + 1 tensors).
        slicing: `fixed` (the `grid` above) or `adaptive`: a grid per image by `adaptive_grid`,
            at most `max_slices` slices plus the whole image.
        max_slices: the adaptive slicing budget.
        unit: the encoder's patch (a conv tower's stride) in pixels: native sides are multiples of it.
        min_side, max_side: native's side bounds (default: half and twice `size`).
    """

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: str = "pad"
    grid: int = 0
    slicing: str = "fixed"
    max_slices: int = 4
    unit: int = 1
    min_side: int | None = None
    max_side: int | None = None

    def __post_init__(self):
        if self.slicing not in ("fixed", "adaptive"):
            raise ValueError(f"unknown slicing {self.slicing!r} (use fixed or adaptive)")
        if self.slicing == "adaptive" and (self.grid or self.max_slices < 2):
            raise ValueError(f"adaptive slicing takes max_slices >= 2 (got {self.max_slices}) and no fixed grid")
        if self.resize == "native" and (self.grid or self.slicing == "adaptive"):
            raise ValueError("resize native encodes the whole image as it is: not with image splitting or slicing")
        self.min_side = self.min_side or max(self.unit, self.size // 2)
        self.max_side = self.max_side or 2 * self.size

    @property
    def variable(self) -> bool:
        """Whether the views (adaptive) or their shape (native) depend on the image's size."""
        return self.slicing == "adaptive" or self.resize == "native"

    @property
    def num_views(self) -> int:
        """Views of every image (fixed grids); with adaptive slicing the most an image gets."""
        if self.slicing == "adaptive":
            return self.max_slices + 1
        return self.grid * self.grid + 1 if self.grid else 1

    def grid_for(self, size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the slices of an image of `size` (width, height); (0, 0): none."""
        if self.slicing == "adaptive":
            return adaptive_grid(size[0], size[1], self.size, self.max_slices)
        return self.grid, self.grid

    def input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the encoder's input for the whole image of `size`."""
        if self.resize == "native":
            return native_size(size[0], size[1], self.unit, self.min_side, self.max_side)
        return self.size, self.size

    def settings(self) -> dict:
        """Every setting that changes the pixels the encoder sees (part of a feature-cache key)."""
        out = {
            "image_size": self.size,
            "mean": [round(x, 6) for x in self.mean],
            "std": [round(x, 6) for x in self.std],
            "resize": self.resize,
            "grid": self.grid,
        }
        if self.slicing != "fixed":
            out.update(slicing=self.slicing, max_slices=self.max_slices)
        if self.resize == "native":
            out.update(unit=self.unit, min_side=self.min_side, max_side=self.max_side)
        return out

    @classmethod
    def from_encoder(
        cls, path: str, size: int | None = None, resize: str = "pad", grid: int = 0, **options
    ) -> ImageProcessor:
        """Read mean, std and resolution from an encoder's `preprocessor_config.json`; `options`:
        the slicing and native fields."""
        from transformers import AutoImageProcessor

        from vlmforge import runtime
        from vlmforge.io import unusable

        try:
            with runtime.quiet_libraries():
                proc = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise unusable(path, "an image processor (preprocessor_config.json)", e) from e
        s = proc.size
        native = getattr(s, "height", None) or getattr(s, "shortest_edge", None)
        if native is None and isinstance(s, dict):
            native = s.get("height") or s.get("shortest_edge")
        crop = getattr(proc, "crop_size", None)
        if crop is not None:  # CLIP: resize shortest edge then centre-crop; the crop is the input size
            native = getattr(crop, "height", None) or (crop.get("height") if isinstance(crop, dict) else native)
        return cls(
            size=int(size or native),
            mean=tuple(float(x) for x in proc.image_mean),
            std=tuple(float(x) for x in proc.image_std),
            resize=resize,
            grid=grid,
            **options,
        )

    def prepare(self, img: Image.Image) -> Image.Image:
        if self.resize == "pad":
            fill = tuple(int(round(m * 255)) for m in self.mean)
            return resize_pad(img, self.size, fill)
        if self.resize == "expand":
            return expand_square(img, self.size, tuple(int(m * 255) for m in self.mean))
        if self.resize == "squash":
            return img.resize((self.size, self.size), Image.BICUBIC)
        if self.resize == "crop":
            return resize_crop(img, self.size)
        if self.resize == "native":
            size = self.input_size(img.size)
            return img.resize(size, Image.BICUBIC) if size != img.size else img
        raise ValueError(f"unknown resize policy {self.resize!r} (use pad, expand, squash, crop or native)")

    def __call__(self, img: Image.Image):
        """Return a float tensor [3, H, W] normalised with the encoder's mean and std (H = W = size
        unless native)."""
        import torch

        arr = np.asarray(self.prepare(img), dtype=np.float32) / 255.0  # [H, W, 3]
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())

    def views(self, img: Image.Image):
        """The encoder inputs of one image: [views, 3, H, W] (slices row-major first, then the
        whole image; `grid_for(img.size)` says how many)."""
        import torch

        grid = self.grid_for(img.size)
        parts = split_image(img, grid) if grid[0] else [img]
        return torch.stack([self(p) for p in parts])
