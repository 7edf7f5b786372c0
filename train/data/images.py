"""Image preprocessing for the VLM with Pillow and numpy: read, convert to RGB, resize to the model's
square input, scale to [0, 1] and normalise per channel ((x - mean) / std, SigLIP's convention).

Modes Pillow can turn into RGB without guessing (RGB, RGBA and LA over white, L, P, 1) are accepted;
others (CMYK, 16-bit, float) and unreadable or tiny files are errors naming the file."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

ACCEPTED_MODES = ("RGB", "RGBA", "L", "LA", "P", "1")
MIN_SIDE = 4  # pixels; smaller images carry nothing a patch could see


def open_image(path, name: str | None = None):
    """The decoded image (Pillow), checked: readable and complete, not a decompression bomb, a mode we
    convert without guessing, at least MIN_SIDE pixels a side. Any failure is one error naming the file
    (`path` may also be an open binary file, such as an upload; `name` then names it in errors)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(path, str | Path):
        path = Path(path)
    path_name = name or path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.mode not in ACCEPTED_MODES:
                    raise UserError(
                        f"{path_name}: image mode {im.mode!r} is not supported (use RGB, RGBA, grayscale or palette)"
                    )
                if min(im.size) < MIN_SIDE:
                    raise UserError(
                        f"{path_name}: the image is {im.size[0]}x{im.size[1]} pixels, smaller than {MIN_SIDE}"
                    )
                im.load()
                return im.copy()
    except FileNotFoundError:
        raise UserError(f"{path_name}: image file not found") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise UserError(f"{path_name}: refused as a possible decompression bomb ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path_name}: cannot read the image ({e})") from None


_CHECKED: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime) of images already checked in this process


def check_image(path: Path) -> None:
    """Decode the image once (its checks in open_image) before training starts; remembered per file."""
    st = path.stat()
    key = (st.st_size, st.st_mtime_ns)
    if _CHECKED.get(path) != key:
        open_image(path)
        _CHECKED[path] = key


def load_image(path, size: int, mean: float = 0.5, std: float = 0.5, name: str | None = None) -> torch.Tensor:
    """[3, size, size] float32 (`path` a file name or an open binary file, as open_image takes)."""
    from PIL import Image

    image = open_image(path, name)
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - mean) / std


class ImageLoader:
    """Loads a model's images (its size and normalisation) and keeps the most recently used ones, up to
    `cache_bytes` of tensors."""

    def __init__(self, config, cache_bytes: int = 256 << 20):
        self.size, self.mean, self.std = config.image_size, config.image_mean, config.image_std
        self.cache: OrderedDict[Path, torch.Tensor] = OrderedDict()
        self.cache_items = max(1, cache_bytes // (3 * self.size * self.size * 4))

    def __call__(self, paths) -> torch.Tensor:
        out = []
        for p in paths:
            p = Path(p)
            if p in self.cache:
                self.cache.move_to_end(p)
            else:
                self.cache[p] = load_image(p, self.size, self.mean, self.std)
                if len(self.cache) > self.cache_items:
                    self.cache.popitem(last=False)
            out.append(self.cache[p])
        return torch.stack(out) if out else torch.zeros(0, 3, self.size, self.size)


def image_inputs(model) -> tuple[int, ImageLoader | None]:
    """(image tokens per image, an image loader) for a VLM; (0, None) for a text model."""
    config = model.config
    if config.model_type != "vlm":
        return 0, None
    return config.image_tokens, ImageLoader(config)
