"""Sample photographs and torchvision-compatible ImageNet preprocessing (numpy + PIL, no torch).

`sample_images()` reads colour photographs that ship inside the scikit-image wheel
(skimage/data/*.png|jpg) straight from disk with PIL, so it never touches the network
(skimage.data's fetchers may fall back to a pooch download; we do not call them).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> file inside skimage/data. Only photos that the pretrained torchvision MobileNet v2
# (mbn_codegen.models.create("mobilenet_v2", weights="pretrained")) classifies sensibly; measured
# top-1 with this module's preprocess(). astronaut.png (-> "bobsled") and rocket.jpg
# (-> "drilling platform") are also on disk but left out.
SAMPLE_FILES = {
    "chelsea": "chelsea.png",             # a cat: 285 Egyptian cat 0.72 (282 tiger cat, 281 tabby)
    "coffee": "coffee.png",               # a cup of coffee: 967 espresso 0.99
    "motorcycle": "motorcycle_left.png",  # a motorcycle: 665 moped 0.59 (670 motor scooter 0.37)
    "camera": "camera.png",               # cameraman (greyscale, given as RGB): 872 tripod 0.98
}


def _skimage_data_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("scikit-image is not installed; sample images come from its data folder "
                         "(pip install scikit-image==0.26.0)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def sample_images() -> dict[str, np.ndarray]:
    """Real photographs bundled with scikit-image, as HxWx3 uint8 RGB arrays (no download)."""
    data = _skimage_data_dir()
    return {name: load_image(data / fname) for name, fname in SAMPLE_FILES.items()}


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read a JPEG/PNG/... file into an HxWx3 uint8 RGB array (EXIF orientation applied).

    Raises ValueError naming the path and the reason when the file is missing or unreadable.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise ValueError(f"image {p}: file does not exist")
    if not p.is_file():
        raise ValueError(f"image {p}: not a regular file")
    try:
        with Image.open(p) as im:
            return np.array(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)  # writable copy
    except UnidentifiedImageError:
        raise ValueError(f"image {p}: not an image format PIL can read "
                         "(expected JPEG, PNG, BMP, GIF, TIFF, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated/corrupt data, permissions
        raise ValueError(f"image {p}: cannot be decoded ({type(e).__name__}: {e})") from None


def _as_rgb_uint8(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"preprocess expects a uint8 image (0..255), got dtype {img.dtype}")
    if img.ndim == 3 and img.shape[2] in (1, 4):      # greyscale with a channel axis, or RGBA
        img = img[:, :, 0] if img.shape[2] == 1 else img[:, :, :3]
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"preprocess expects an HxWx3 (or HxW) image, got shape {img.shape}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"preprocess got an empty image of shape {img.shape}")
    return np.ascontiguousarray(img)


def preprocess(img: np.ndarray, resolution: int = 224) -> np.ndarray:
    """torchvision's ImageNet eval transform, as float32 NCHW (1, 3, R, R).

    Same as transforms.Compose([Resize(round(R*256/224)), CenterCrop(R), ToTensor(),
    Normalize(IMAGENET_MEAN, IMAGENET_STD)]) applied to a PIL image: the shorter side is
    resized with PIL's (antialiased) bilinear filter, then centre-cropped.
    """
    from PIL import Image

    if int(resolution) != resolution or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    r = int(resolution)
    img = _as_rgb_uint8(img)
    h, w = img.shape[:2]
    size = int(round(r * 256 / 224))
    # torchvision _compute_resized_output_size: short side -> size, long side truncated. As
    # size >= r, torchvision's center_crop never pads here.
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    top, left = int(round((new_h - r) / 2.0)), int(round((new_w - r) / 2.0))
    pil = Image.fromarray(img).resize((new_w, new_h), Image.BILINEAR).crop((left, top, left + r, top + r))
    x = np.asarray(pil, dtype=np.float32) / np.float32(255.0)
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])
