"""Image loading and processing.

Loading refuses missing, corrupt, truncated and oversized files with an `ImageError` naming the
file. Processing follows Idefics2's finding that images should keep their aspect ratio: the long
side is resized to the encoder resolution and the rest padded with the normalisation mean (so the
padding is zero after normalisation). `split_image` cuts an image into a grid of crops plus the
whole image, as in LLaVA-UHD / Idefics2 image splitting.
"""

from __future__ import annotations

import io
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
        grid: image splitting: 0 encodes the whole image only; k cuts it into k x k crops plus the
            whole image (`views` returns k*k + 1 tensors).
    """

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: str = "pad"
    grid: int = 0

    @property
    def num_views(self) -> int:
        return self.grid * self.grid + 1 if self.grid else 1

    def settings(self) -> dict:
        """Every setting that changes the pixels the encoder sees (part of a feature-cache key)."""
        return {
            "image_size": self.size,
            "mean": [round(x, 6) for x in self.mean],
            "std": [round(x, 6) for x in self.std],
            "resize": self.resize,
            "grid": self.grid,
        }

    @classmethod
    def from_encoder(cls, path: str, size: int | None = None, resize: str = "pad", grid: int = 0) -> ImageProcessor:
        """Read mean, std and resolution from an encoder's `preprocessor_config.json`."""
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
        raise ValueError(f"unknown resize policy {self.resize!r} (use pad, expand, squash or crop)")

    def __call__(self, img: Image.Image):
        """Return a float tensor [3, size, size] normalised with the encoder's mean and std."""
        import torch

        arr = np.asarray(self.prepare(img), dtype=np.float32) / 255.0  # [H, W, 3]
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())

    def views(self, img: Image.Image):
        """The encoder inputs of one image: [num_views, 3, size, size] (crops first, then the whole)."""
        import torch

        parts = split_image(img, (self.grid, self.grid)) if self.grid else [img]
        return torch.stack([self(p) for p in parts])
