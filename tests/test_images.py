"""ImageNet labels, sample photos, preprocessing, and the pretrained v2 on real photos."""
import subprocess
import sys

import numpy as np
import pytest

from mbn_codegen import images
from mbn_codegen.models import LABELS_FILE, imagenet_labels

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
CAT_CLASSES = range(281, 286)         # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}      # espresso, cup, coffee mug


def test_labels_file():
    assert LABELS_FILE.is_file()
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert len(set(labels)) == 1000
    assert all(lab and lab == lab.strip() for lab in labels)
    assert labels[0] == "tench"
    assert labels[1] == "goldfish"
    assert labels[281] == "tabby"
    assert labels[285] == "Egyptian cat"
    assert labels[967] == "espresso"
    assert labels[968] == "cup"
    assert labels[999] == "toilet tissue"


def test_sample_images():
    imgs = images.sample_images()
    assert {"chelsea", "coffee"} <= set(imgs)
    for name, img in imgs.items():
        assert img.dtype == np.uint8, name
        assert img.ndim == 3 and img.shape[2] == 3, name
        assert min(img.shape[:2]) >= 100, name
        assert img.std() > 10, name  # a real photo, not a flat image
    assert imgs["chelsea"].shape == (300, 451, 3)


def test_no_torch_needed():
    code = ("import sys; from mbn_codegen import images; "
            "x = images.preprocess(images.sample_images()['chelsea']); "
            "assert x.shape == (1, 3, 224, 224); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("res", [224, 192, 160, 128, 96])
def test_preprocess_shape_dtype(res):
    img = images.sample_images()["chelsea"]
    x = images.preprocess(img, resolution=res)
    assert x.shape == (1, 3, res, res)
    assert x.dtype == np.float32
    assert x.flags["C_CONTIGUOUS"]
    assert np.isfinite(x).all()
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert (x >= lo[None, :, None, None] - 1e-5).all() and (x <= hi[None, :, None, None] + 1e-5).all()


def test_preprocess_normalisation_constant_image():
    img = np.empty((300, 500, 3), np.uint8)
    img[...] = (200, 100, 50)
    x = images.preprocess(img)
    want = (np.array([200, 100, 50], np.float32) / 255 - MEAN) / STD
    np.testing.assert_allclose(x[0, :, 0, 0], want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(x[0], np.broadcast_to(want[:, None, None], (3, 224, 224)), atol=1e-6)


def test_preprocess_resize_and_centre_crop():
    # A 512x256 (HxW) image: short side 256 -> no resize; crop rows 144..367, cols 16..239.
    img = np.zeros((512, 256, 3), np.uint8)
    img[144:368, 16:240] = 255
    x = images.preprocess(img)
    np.testing.assert_allclose(x[0, :, :, :], np.broadcast_to(((1 - MEAN) / STD)[:, None, None],
                                                             (3, 224, 224)), atol=1e-6)
    # Shrinking 2x (short side 512 -> 256) keeps the same picture.
    big = np.zeros((1024, 512, 3), np.uint8)
    big[288:736, 32:480] = 255
    y = images.preprocess(big)
    assert np.abs(y[0, :, 1:-1, 1:-1] - x[0, :, 1:-1, 1:-1]).max() < 1e-5


def test_preprocess_greyscale_and_rgba():
    grey = np.full((240, 320), 128, np.uint8)
    x = images.preprocess(grey)
    assert x.shape == (1, 3, 224, 224)
    np.testing.assert_allclose(x[0, :, 5, 5], (128 / 255 - MEAN) / STD, atol=1e-6)
    rgba = np.full((240, 320, 4), 128, np.uint8)
    np.testing.assert_array_equal(images.preprocess(rgba), x)
    with pytest.raises(ValueError, match="uint8"):
        images.preprocess(grey.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        images.preprocess(np.zeros((10, 10, 2), np.uint8))


def test_load_image_roundtrip_and_errors(tmp_path):
    from PIL import Image

    img = images.sample_images()["coffee"]
    png = tmp_path / "coffee.png"
    Image.fromarray(img).save(png)
    np.testing.assert_array_equal(images.load_image(png), img)
    jpg = tmp_path / "coffee.jpg"
    Image.fromarray(img).save(jpg, quality=95)
    back = images.load_image(str(jpg))
    assert back.shape == img.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - img).mean() < 5

    with pytest.raises(ValueError, match="does not exist"):
        images.load_image(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="not a regular file"):
        images.load_image(tmp_path)
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not an image")
    with pytest.raises(ValueError, match=r"notes\.jpg.*not an image"):
        images.load_image(bad)
    cut = tmp_path / "cut.png"
    cut.write_bytes(png.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"cut\.png.*cannot be decoded"):
        images.load_image(cut)


@pytest.fixture(scope="module")
def pretrained_v2():
    pytest.importorskip("torch")
    from mbn_codegen.models import create
    return create("mobilenet_v2", weights="pretrained")


def _top5(model, img):
    import torch
    with torch.no_grad():
        p = torch.softmax(model(torch.from_numpy(images.preprocess(img))), 1)[0]
    v, i = p.topk(5)
    return i.tolist(), v.tolist()


def test_pretrained_v2_classifies_photos(pretrained_v2):
    imgs = images.sample_images()
    labels = imagenet_labels()
    idx, prob = _top5(pretrained_v2, imgs["chelsea"])
    assert idx[0] in CAT_CLASSES, [labels[i] for i in idx]
    assert sum(p for i, p in zip(idx, prob) if i in CAT_CLASSES) > 0.9  # measured 0.99
    idx, prob = _top5(pretrained_v2, imgs["coffee"])
    assert idx[0] in COFFEE_CLASSES, [labels[i] for i in idx]
    assert idx[0] == 967 and prob[0] > 0.9  # espresso, measured 0.992
