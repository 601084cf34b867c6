"""Preprocessing presets, mean/std parsing, ImageFolder scanning and .npz loading."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsgonnx.errors import DataError
from dsgonnx.preprocess import (
    PRESETS,
    Preprocess,
    load_image,
    load_npz,
    parse_channel_values,
    preprocess_from_preset,
    read_class_list,
    scan_image_folder,
)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
IMAGENET = SHARED / "datasets" / "imagenet-samples"
CIFAR = SHARED / "datasets" / "cifar10-test"
needs_imagenet = pytest.mark.skipif(not IMAGENET.is_dir(), reason="../shared/datasets/imagenet-samples not present")
needs_cifar = pytest.mark.skipif(not CIFAR.is_dir(), reason="../shared/datasets/cifar10-test not present")


def _png(path: Path, size=(12, 10), color=(10, 200, 30), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path)
    return path


# --- presets and overrides -------------------------------------------------------------


def test_presets_match_the_documented_recipes():
    imagenet = preprocess_from_preset("imagenet").for_input_size(224)
    assert (imagenet.resize, imagenet.crop, imagenet.pixel_scale) == (256, 224, 1.0)
    assert imagenet.mean == (0.485, 0.456, 0.406) and imagenet.std == (0.229, 0.224, 0.225)
    assert preprocess_from_preset("inception").mean == (0.5,) * 3
    tflite = preprocess_from_preset("tf-lite")
    assert (tflite.pixel_scale, tflite.mean, tflite.std) == (255.0, (127.0,) * 3, (128.0,) * 3)
    none = preprocess_from_preset("none").for_input_size(32)
    assert (none.resize, none.crop, none.mean, none.std) == (32, 32, (0.0,) * 3, (1.0,) * 3)
    assert preprocess_from_preset(None).preset == "imagenet"  # the default


def test_crop_follows_the_model_and_explicit_values_win():
    assert preprocess_from_preset("imagenet").for_input_size(299).resize == 341  # floor(299 / 0.875)
    cifar = preprocess_from_preset("imagenet", resize=32, crop=32).for_input_size(32)
    assert (cifar.resize, cifar.crop) == (32, 32)
    custom = preprocess_from_preset("tf-lite", mean="1,2,3", std="4", channel_order="bgr", pixel_scale=1)
    assert custom.mean == (1.0, 2.0, 3.0) and custom.std == (4.0,) * 3
    assert custom.channel_order == "BGR" and custom.pixel_scale == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"std": "0,1,1"}, "std must be positive"),
        ({"std": "-1"}, "std must be positive"),
        ({"std": "nan"}, "std must be one number or three comma-separated finite numbers"),
        ({"mean": "1,2"}, "mean must be one number or three"),
        ({"mean": "a,b,c"}, "mean must be one number or three"),
        ({"resize": 100, "crop": 224}, "resize 100 is smaller than crop 224"),
        ({"crop": 0}, "crop must be a positive whole number"),
        ({"channel_order": "rgba"}, "channel order must be RGB or BGR"),
        ({"pixel_scale": -1.0}, "pixel scale must be a positive number"),
    ],
)
def test_bad_recipes_are_data_errors(kwargs, message):
    with pytest.raises(DataError, match=message):
        preprocess_from_preset("imagenet", **kwargs)


def test_unknown_preset_and_model_size_conflicts():
    with pytest.raises(DataError, match="unknown preprocessing preset"):
        preprocess_from_preset("caffe")
    with pytest.raises(DataError, match="crop 224 does not match the model's input size 32"):
        preprocess_from_preset("imagenet", crop=224).for_input_size(32)
    with pytest.raises(DataError, match="dynamic: give the crop size"):
        preprocess_from_preset("imagenet").for_input_size(None)
    assert preprocess_from_preset("imagenet", crop=64).for_input_size(None).resize == 73


def test_parse_channel_values():
    assert parse_channel_values("0.5") == (0.5, 0.5, 0.5)
    assert parse_channel_values(" 104, 117 ,123") == (104.0, 117.0, 123.0)
    with pytest.raises(DataError):
        parse_channel_values("1,2,3,4", "std")
    with pytest.raises(DataError):
        parse_channel_values("nan", "std")


# --- pixels ------------------------------------------------------------------------------


def test_apply_resizes_the_shorter_side_crops_the_centre_and_normalises(tmp_path):
    # 20x10 image: left half red, right half blue. Resize shorter side 10 -> 4: 8x4; crop 4 keeps the middle.
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    image.paste((0, 0, 255), (10, 0, 20, 10))
    recipe = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize=4, crop=4)
    out = recipe.apply(image)
    expected_resized = np.asarray(image.resize((8, 4), Image.BILINEAR), np.float32)[:, 2:6]
    expected = ((expected_resized / 255 - 0.5) / 0.5).transpose(2, 0, 1)
    assert out.shape == (3, 4, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out[0, 0, 0] > 0.9 and out[2, 0, -1] > 0.9  # red on the left, blue on the right


def test_tf_lite_bgr_and_pixel_scale(tmp_path):
    image = Image.new("RGB", (4, 4), (255, 127, 0))
    tflite = preprocess_from_preset("tf-lite", crop=4).for_input_size(4)
    np.testing.assert_allclose(tflite.apply(image)[:, 0, 0], [(255 - 127) / 128, 0.0, -127 / 128])
    caffe = preprocess_from_preset("none", channel_order="BGR", mean="104,117,123", crop=4).for_input_size(4)
    np.testing.assert_allclose(caffe.apply(image)[:, 0, 0], [0 - 104, 127 - 117, 255 - 123])
    unit = preprocess_from_preset("none", pixel_scale=1, crop=4).for_input_size(4)
    np.testing.assert_allclose(unit.apply(image)[:, 0, 0], [1.0, 127 / 255, 0.0], rtol=1e-6)


def test_grayscale_and_rgba_images_become_rgb(tmp_path):
    recipe = preprocess_from_preset("none", crop=4).for_input_size(4)
    gray = load_image(str(_png(tmp_path / "g.png", (4, 4), (77, 0, 0), mode="L")), recipe)
    assert gray.shape == (3, 4, 4) and np.all(gray == 77)
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (6, 4), (1, 2, 3, 100)).save(rgba)
    assert load_image(str(rgba), recipe)[:, 0, 0].tolist() == [1, 2, 3]


def test_a_grey_model_gets_the_luma_of_colour_images(tmp_path):
    """For a model of one channel, image files become grey (PIL's luma, 299/587/114 per
    thousand), normalised with the recipe's first mean and std; 4 channels are refused."""
    recipe = preprocess_from_preset("none", mean="10", std="2", crop=4).for_input_size(4)
    colour = load_image(str(_png(tmp_path / "c.png", (4, 4), (200, 100, 50))), recipe, channels=1)
    luma = round((200 * 299 + 100 * 587 + 50 * 114) / 1000)
    assert colour.shape == (1, 4, 4) and colour.dtype == np.float32
    np.testing.assert_allclose(colour, (luma - 10) / 2, atol=0.5)
    grey = load_image(str(_png(tmp_path / "g.png", (4, 4), (77, 0, 0), mode="L")), recipe, channels=1)
    np.testing.assert_array_equal(grey, np.full((1, 4, 4), (77 - 10) / 2, np.float32))
    with pytest.raises(DataError, match="takes 4 channels and image files give 1 .grey. or 3 .RGB."):
        load_image(str(tmp_path / "g.png"), recipe, channels=4)


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        load_image(str(bad), preprocess_from_preset("none", crop=4).for_input_size(4))
    truncated = tmp_path / "truncated.jpg"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "full.jpg")
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    with pytest.raises(DataError, match="truncated.jpg"):
        load_image(str(truncated), preprocess_from_preset("none", crop=4).for_input_size(4))


# --- folders -------------------------------------------------------------------------------


def test_image_folder_labels_follow_sorted_folder_names(tmp_path):
    for name in ("zebra", "ant", "Mole"):  # created out of order; sorting is by code point
        _png(tmp_path / name / "b.png")
        _png(tmp_path / name / "a.jpg")
    _png(tmp_path / "ant" / "nested" / "c.PNG")  # found recursively, extension case-insensitive
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    _png(tmp_path / ".hidden" / "x.png")  # hidden folders are not classes
    (tmp_path / "README.md").write_text("top-level non-image files are ignored")
    folder = scan_image_folder(str(tmp_path))
    assert folder.classes == ("Mole", "ant", "zebra")
    names = [os.path.relpath(f, tmp_path) for f in folder.files]
    assert names == ["Mole/a.jpg", "Mole/b.png", "ant/a.jpg", "ant/b.png", "ant/nested/c.PNG", "zebra/a.jpg", "zebra/b.png"]
    assert folder.labels == (0, 0, 1, 1, 1, 2, 2)


def test_class_list_labels_a_subset_by_name(tmp_path):
    for name in ("cat", "ship"):
        _png(tmp_path / name / "0.png")
    (tmp_path / "classes.txt").write_text("airplane\ncat\ndog\nship\n")
    folder = scan_image_folder(str(tmp_path), read_class_list(str(tmp_path / "classes.txt")))
    assert folder.labels == (1, 3)
    with pytest.raises(DataError, match="'ship' is not in the class list"):
        scan_image_folder(str(tmp_path), ("cat", "dog"))


def test_flat_folder_is_unlabelled_and_bad_layouts_fail(tmp_path):
    _png(tmp_path / "flat" / "1.png")
    _png(tmp_path / "flat" / "0.png")
    flat = scan_image_folder(str(tmp_path / "flat"))
    assert not flat.labelled and [os.path.basename(f) for f in flat.files] == ["0.png", "1.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        scan_image_folder(str(tmp_path / "empty"))
    (tmp_path / "mixed" / "cls").mkdir(parents=True)
    _png(tmp_path / "mixed" / "cls" / "0.png")
    _png(tmp_path / "mixed" / "loose.png")
    with pytest.raises(DataError, match="both class folders and loose images"):
        scan_image_folder(str(tmp_path / "mixed"))
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    _png(tmp_path / "hollow" / "b" / "0.png")
    with pytest.raises(DataError, match="has no images"):
        scan_image_folder(str(tmp_path / "hollow"))
    with pytest.raises(DataError, match="not found"):
        scan_image_folder(str(tmp_path / "missing"))


# --- npz ---------------------------------------------------------------------------------------


def test_load_npz_checks_keys_dtypes_and_shapes(tmp_path):
    images = np.zeros((4, 3, 2, 2), np.float32)
    np.savez(tmp_path / "ok.npz", images=images, labels=np.array([0, 1, 2, 3], np.int32))
    got, labels = load_npz(str(tmp_path / "ok.npz"))
    assert got.shape == images.shape and labels.dtype == np.int64
    np.savez(tmp_path / "unlabelled.npz", images=images)
    assert load_npz(str(tmp_path / "unlabelled.npz"))[1] is None

    cases = {
        "nokey.npz": ({"pixels": images}, "has no 'images'"),
        "uint8.npz": ({"images": images.astype(np.uint8)}, "must be floating point"),
        "flabels.npz": ({"images": images, "labels": np.zeros(4, np.float32)}, "'labels' must be integers"),
        "nlabels.npz": ({"images": images, "labels": np.zeros(3, np.int64)}, r"must have shape \(4,\)"),
        "nan.npz": ({"images": np.full((1, 3, 2, 2), np.nan, np.float32)}, "NaN"),
        "empty.npz": ({"images": np.zeros((0, 3), np.float32)}, "N ≥ 1"),
        "objects.npz": ({"images": np.array([object()], dtype=object)}, "cannot read"),
        "heldshape.npz": ({"images": images, "holdout": np.zeros((2, 3, 2, 3), np.float32)}, "shaped as 'images'"),
        "heldnan.npz": ({"images": images, "holdout": np.full((2, 3, 2, 2), np.nan, np.float32)},
                        "'holdout' contains NaN"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(DataError, match=message):
            load_npz(str(tmp_path / name))
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(DataError, match="is not an .npz file"):
        load_npz(str(tmp_path / "text.npz"))


# --- real data (../shared) ------------------------------------------------------------------------


@needs_imagenet
def test_imagenet_samples_class_order_is_sorted_wordnet_ids():
    folder = scan_image_folder(str(IMAGENET))
    dirs = sorted(d for d in os.listdir(IMAGENET) if (IMAGENET / d).is_dir())
    assert len(folder.classes) == 1000 and list(folder.classes) == dirs
    assert folder.classes[0] == "n01440764" and folder.classes[-1] == "n15075141"  # tench ... toilet tissue
    for path, label in list(zip(folder.files, folder.labels))[::97]:
        assert Path(path).parent.name == dirs[label]


@needs_imagenet
def test_imagenet_preprocessing_matches_torchvision():
    """Our PIL pipeline reproduces torchvision's Resize(256)/CenterCrop(224)/ToTensor/Normalize."""
    transforms = pytest.importorskip("torchvision.transforms")
    folder = scan_image_folder(str(IMAGENET))
    recipe = preprocess_from_preset("imagenet").for_input_size(224)
    reference = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
         transforms.Normalize(PRESETS["imagenet"].mean, PRESETS["imagenet"].std)]
    )
    for path in folder.files[::250]:
        ours = load_image(path, recipe)
        with Image.open(path) as image:
            theirs = reference(image.convert("RGB")).numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


@needs_cifar
def test_cifar10_class_order_is_the_standard_one():
    folder = scan_image_folder(str(CIFAR))
    assert folder.classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert len(folder.files) == 10000 and folder.labels[:1] == (0,) and folder.labels[-1] == 9
    image = load_image(folder.files[0], preprocess_from_preset("imagenet", resize=32, crop=32).for_input_size(32))
    assert image.shape == (3, 32, 32)
