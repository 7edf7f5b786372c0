"""Image preprocessing for the VLM with Pillow and numpy: read, convert to RGB, resize to the model's
square input, scale to [0, 1] and normalise per channel ((x - mean) / std, SigLIP's convention).

Modes Pillow can turn into RGB without guessing (RGB, RGBA and LA over white, L, P, 1) are accepted;
others (CMYK, 16-bit, float) and unreadable or tiny files are errors naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

ACCEPTED_MODES = ("RGB", "RGBA", "L", "LA", "P", "1")
MIN_SIDE = 4  # pixels; smaller images carry nothing a patch could see


def load_image(path: str | Path, size: int, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """[3, size, size] float32."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            image = im.copy()
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: cannot read the image ({e})") from None
    if image.mode not in ACCEPTED_MODES:
        raise UserError(f"{path}: image mode {image.mode!r} is not supported (use RGB, RGBA, grayscale or palette)")
    if min(image.size) < MIN_SIDE:
        raise UserError(f"{path}: the image is {image.size[0]}x{image.size[1]} pixels, smaller than {MIN_SIDE}")
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
    """Loads a model's images (its size and normalisation); remembers what it has loaded."""

    def __init__(self, config):
        self.size, self.mean, self.std = config.image_size, config.image_mean, config.image_std
        self.cache: dict[Path, torch.Tensor] = {}

    def __call__(self, paths) -> torch.Tensor:
        out = []
        for p in paths:
            p = Path(p)
            if p not in self.cache:
                self.cache[p] = load_image(p, self.size, self.mean, self.std)
            out.append(self.cache[p])
        return torch.stack(out) if out else torch.zeros(0, 3, self.size, self.size)


def image_inputs(model) -> tuple[int, ImageLoader | None]:
    """(image tokens per image, an image loader) for a VLM; (0, None) for a text model."""
    config = model.config
    if config.model_type != "vlm":
        return 0, None
    return config.image_tokens, ImageLoader(config)
