import numpy as np
import pytest
from PIL import Image

from vlmforge.data.images import ImageError, ImageProcessor, load_image, resize_pad, split_image


def test_resize_pad_keeps_aspect():
    img = Image.new("RGB", (100, 50), (255, 0, 0))
    out = resize_pad(img, 64, (0, 0, 255))
    assert out.size == (64, 64)
    a = np.asarray(out)
    red = (a[..., 0] > 200) & (a[..., 2] < 50)
    rows = np.where(red.any(1))[0]
    cols = np.where(red.any(0))[0]
    assert cols.min() == 0 and cols.max() == 63
    assert rows.max() - rows.min() + 1 == 32  # 100x50 -> 64x32, centred
    assert rows.min() == 16
    assert tuple(a[0, 0]) == (0, 0, 255)  # padding colour


def test_processor_pads_with_mean_so_padding_is_zero():
    proc = ImageProcessor(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = proc(Image.new("RGB", (64, 16), (255, 255, 255)))
    assert x.shape == (3, 32, 32)
    assert x[:, 0, 0].abs().max() < 0.01  # padding
    assert (x[:, 16, 16] - 1).abs().max() < 1e-6  # white -> +1
    squash = ImageProcessor(size=32, resize="squash")(Image.new("RGB", (64, 16), (255, 255, 255)))
    assert (squash - 1).abs().max() < 1e-6


def test_split_image_grid_plus_whole():
    img = Image.fromarray(np.arange(60 * 40 * 3, dtype=np.uint8).reshape(40, 60, 3))
    parts = split_image(img, (2, 2))
    assert len(parts) == 5
    assert [p.size for p in parts[:4]] == [(30, 20)] * 4
    assert parts[4].size == (60, 40)
    assert np.array_equal(np.asarray(parts[1]), np.asarray(img)[:20, 30:])
    assert np.array_equal(np.asarray(parts[2]), np.asarray(img)[20:, :30])
    assert len(split_image(img, (1, 3))) == 4


def test_bad_images_name_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 40), (1, 2, 3)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-30])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image at all")
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(big)
    assert load_image(good).size == (40, 40)
    cases = ((truncated, "cannot decode"), (corrupt, "cannot decode"), (tmp_path / "missing.png", "not found"))
    for path, words in cases:
        with pytest.raises(ImageError, match=words) as e:
            load_image(path)
        assert str(path) in str(e.value)
    with pytest.raises(ImageError, match="too large") as e:
        load_image(big, max_pixels=10_000)
    assert "big.png" in str(e.value)
