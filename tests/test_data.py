"""fpet_kernels.data: the VTAB-1k and ImageFolder loaders, the pocket-VTAB generators and cache, parse_data_spec.

Everything is written under pytest's tmp_path (FPET_DATA_DIR is pointed there too), never into the home cache.
Generation runs at small sizes, except one test of the default sizes on a cheap task.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from fpet_kernels import data

TASKS = [t.name for t in data.list_tasks()]


@pytest.fixture(autouse=True)
def _data_dir(tmp_path, monkeypatch):
    """Any generation without an explicit root lands in tmp_path/env_cache, never in the home cache."""
    monkeypatch.setenv("FPET_DATA_DIR", str(tmp_path / "env_cache"))


def _small_sizes(task: str) -> tuple[int, int, int]:
    k = data.get_task(task).num_classes
    return (2 * k, k, 2 * k)


def _write_png(path, mode="RGB", size=(10, 7), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, 50, 200)).save(path)


@pytest.fixture
def vtab_dir(tmp_path):
    """A tiny VTAB-1k folder: images in two subfolders (one grey, one RGBA), labels 0..3 across the list files."""
    root = tmp_path / "vtab"
    _write_png(root / "images" / "a.png")
    _write_png(root / "images" / "b.png", mode="L")
    _write_png(root / "more" / "c.png", mode="RGBA", value=(1, 2, 3, 4))
    (root / "train800.txt").write_text("images/a.png 0\nimages/b.png 1\n")
    (root / "val200.txt").write_text("more/c.png 2\n\n")
    (root / "train800val200.txt").write_text("images/a.png 0\nimages/b.png 1\nmore/c.png 2\n")
    (root / "test.txt").write_text("  images/b.png\t3  \n")
    return root


# --- VTAB-1k loader -----------------------------------------------------------------------------------------------


def test_vtab1k_loads_every_split(vtab_dir):
    lengths = {"train800": 2, "val200": 1, "train800val200": 3, "test": 1}
    for split, n in lengths.items():
        ds = data.VTAB1k(vtab_dir, split)
        assert len(ds) == n and ds.num_classes == 4  # max label over all list files + 1
        image, label = ds[0]
        assert isinstance(image, Image.Image) and image.mode == "RGB"
    ds = data.VTAB1k(vtab_dir, "train800val200")
    assert ds.targets == [0, 1, 2]
    assert ds.samples[2] == (os.path.join(str(vtab_dir), "more", "c.png"), 2)
    assert ds[1][0].getpixel((0, 0)) == (100, 100, 100)  # grey converted to RGB


def test_default_transform(vtab_dir):
    ds = data.VTAB1k(vtab_dir, "train800", transform=data.default_transform())
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y == 0
    assert torch.allclose(x[:, 0, 0], torch.tensor([100, 50, 200]) / 255.0 * 2 - 1, atol=1e-6)  # mean = std = 0.5
    assert data.default_transform(32)(Image.new("RGB", (5, 9))).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="img_size"):
        data.default_transform(0)


@pytest.mark.parametrize(
    "line, error, expected",
    [
        ("images/a.png", ValueError, "2 whitespace-separated fields"),
        ("images/a.png 1 2", ValueError, "2 whitespace-separated fields"),
        ("images/a.png one", ValueError, "integer label >= 0"),
        ("images/a.png 1.0", ValueError, "integer label >= 0"),
        ("images/a.png -1", ValueError, "integer label >= 0"),
        ("../vtab/images/a.png 0", ValueError, "inside it"),
        ("images/../../x.png 0", ValueError, "inside it"),
        ("/etc/passwd 0", ValueError, "inside it"),
        ("images/missing.png 0", FileNotFoundError, "does not exist"),
    ],
)
def test_vtab1k_malformed_line(vtab_dir, line, error, expected):
    list_file = vtab_dir / "train800.txt"
    list_file.write_text(f"images/a.png 0\n{line}\nimages/b.png 1\n")
    with pytest.raises(error) as info:
        data.VTAB1k(vtab_dir, "train800")
    message = str(info.value)
    assert str(list_file) in message and "line 2" in message and expected in message


def test_vtab1k_missing_or_empty_list_file(vtab_dir):
    os.remove(vtab_dir / "test.txt")
    with pytest.raises(FileNotFoundError, match="test.txt"):
        data.VTAB1k(vtab_dir, "test")
    assert data.VTAB1k(vtab_dir, "train800").num_classes == 3  # the other files still load
    (vtab_dir / "val200.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="val200.txt.*no samples"):
        data.VTAB1k(vtab_dir, "val200")


def test_vtab1k_bad_arguments(vtab_dir, tmp_path):
    with pytest.raises(ValueError, match="train800, val200, train800val200, test"):
        data.VTAB1k(vtab_dir, "train")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.VTAB1k(tmp_path / "nowhere", "test")


# --- imagefolder --------------------------------------------------------------------------------------------------


def _image_tree(root, classes=("cat", "dog"), per_class=2):
    for c in classes:
        for i in range(per_class):
            _write_png(root / c / f"{i}.png", mode="L", value=10 * i)


def test_imagefolder(tmp_path):
    _image_tree(tmp_path / "tree")
    ds = data.imagefolder(tmp_path / "tree", transform=data.default_transform(16))
    assert ds.classes == ["cat", "dog"] and len(ds) == 4
    x, y = ds[3]
    assert x.shape == (3, 16, 16) and y == 1
    with pytest.raises(FileNotFoundError, match="absent"):
        data.imagefolder(tmp_path / "absent")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="empty.*holds no images"):
        data.imagefolder(tmp_path / "empty")


# --- pocket-VTAB ----------------------------------------------------------------------------------------------------


def _files(directory):
    out = {}
    for base, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, directory)] = handle.read()
    return out


def test_task_table():
    assert len(TASKS) >= 6 and len(set(TASKS)) == len(TASKS)
    assert {t.group for t in data.list_tasks()} == {"natural", "specialized", "structured"}
    for t in data.list_tasks():
        assert t.num_classes == len(t.class_names) >= 2 and t.description
        assert data.POCKET_VTAB[t.name] is t
    with pytest.raises(ValueError, match="unknown pocket-VTAB task 'nope'.*" + ", ".join(TASKS)):
        data.pocket_vtab_dir("nope")


@pytest.mark.parametrize("task", TASKS)
def test_generation_deterministic_sizes_labels(task, tmp_path):
    sizes = _small_sizes(task)
    k = data.get_task(task).num_classes
    a = data.pocket_vtab_dir(task, root=tmp_path / "a", seed=0, sizes=sizes, progress=False)
    b = data.pocket_vtab_dir(task, root=tmp_path / "b", seed=0, sizes=sizes, progress=False)
    c = data.pocket_vtab_dir(task, root=tmp_path / "c", seed=1, sizes=sizes, progress=False)
    files_a, files_b, files_c = _files(a), _files(b), _files(c)
    assert files_a == files_b  # same seed: the same bytes in every file
    pngs = [name for name in files_a if name.endswith(".png")]
    assert len(pngs) == sum(sizes)
    assert all(files_a[name] != files_c.get(name) for name in pngs)  # another seed: other images
    splits = {s: data.VTAB1k(a, s) for s in data.VTAB1K_SPLITS}
    for split, n in zip(("train800", "val200", "test"), sizes):
        ds = splits[split]
        assert len(ds) == n and ds.num_classes == k
        assert set(Counter(ds.targets).values()) == {n // k}  # balanced
        assert all(0 <= y < k for y in ds.targets)
    assert splits["train800val200"].samples == splits["train800"].samples + splits["val200"].samples
    hashes = set()
    for name in pngs:
        with Image.open(os.path.join(a, name)) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
            hashes.add(hashlib.sha1(image.tobytes()).digest())
    assert len(hashes) == len(pngs)  # no image twice, within or across splits


def test_default_sizes_cache_and_no_duplicates(tmp_path):
    task = "faces"
    directory = data.pocket_vtab_dir(task, progress=False)  # into $FPET_DATA_DIR
    assert directory == os.path.join(str(tmp_path / "env_cache"), task)
    sizes = {s: len(data.VTAB1k(directory, s)) for s in data.VTAB1K_SPLITS}
    assert sizes == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 500}
    for split in ("train800", "val200", "test"):
        assert set(Counter(data.VTAB1k(directory, split).targets).values()) == {sizes[split] // 2}
    train = {hashlib.sha1(np.asarray(img).tobytes()).digest() for img, _ in data.VTAB1k(directory, "train800val200")}
    test = {hashlib.sha1(np.asarray(img).tobytes()).digest() for img, _ in data.VTAB1k(directory, "test")}
    assert len(train) == 1000 and len(test) == 500 and not train & test
    # cached: a second call generates nothing; another seed regenerates in place
    stamp = os.stat(os.path.join(directory, ".complete")).st_mtime_ns
    assert data.pocket_vtab_dir(task, progress=False) == directory
    assert os.stat(os.path.join(directory, ".complete")).st_mtime_ns == stamp
    data.pocket_vtab_dir(task, seed=3, sizes=(2, 2, 2), progress=False)
    assert len(data.VTAB1k(directory, "test")) == 2
    assert '"seed": 3' in open(os.path.join(directory, ".complete")).read()
    assert not [n for n in os.listdir(tmp_path / "env_cache") if n.startswith(".")]  # no partial folders left
    # dataset through the loader
    ds = data.load_pocket_vtab(task, "val200", data.default_transform(), seed=3, sizes=(2, 2, 2), progress=False)
    assert ds[0][0].shape == (3, 64, 64)


def test_foreign_folder_not_overwritten(tmp_path):
    (tmp_path / "count").mkdir()
    (tmp_path / "count" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="count"):
        data.pocket_vtab_dir("count", root=tmp_path, sizes=(8, 8, 8), progress=False)
    assert (tmp_path / "count" / "mine.txt").read_text() == "keep"


def test_generation_errors_leave_nothing(tmp_path):
    with pytest.raises(ValueError, match="digits.*ran out"):  # each digit scan is used once: ~58 test scans a class
        data.pocket_vtab_dir("digits", root=tmp_path, sizes=(10, 10, 600), progress=False)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="seed"):
        data.pocket_vtab_dir("count", root=tmp_path, seed=-1)
    with pytest.raises(ValueError, match="sizes"):
        data.pocket_vtab_dir("count", root=tmp_path, sizes=(1, 2))


# --- parse_data_spec ----------------------------------------------------------------------------------------------


def test_parse_data_spec_pocket_vtab(tmp_path):
    spec = data.parse_data_spec("pocket-vtab:location", root=str(tmp_path), sizes=(9, 9, 18))
    assert (spec.kind, spec.target, spec.num_classes) == ("pocket-vtab", "location", 9)
    assert str(spec) == "pocket-vtab:location"
    assert not os.listdir(tmp_path)  # nothing generated before a dataset is asked for
    splits = spec.datasets()
    assert (len(splits.train), len(splits.val), len(splits.test), splits.num_classes) == (9, 9, 18, 9)
    assert splits.train[0][0].shape == (3, 64, 64)
    final = spec.datasets(img_size=32, final=True)
    assert len(final.train) == 18 and final.val is None and final.train[0][0].shape == (3, 32, 32)


def test_parse_data_spec_vtab1k(vtab_dir):
    spec = data.parse_data_spec(f"vtab1k:{vtab_dir}")
    splits = spec.datasets()
    assert (len(splits.train), len(splits.val), len(splits.test), splits.num_classes) == (2, 1, 1, 4)
    assert len(spec.dataset("trainval")) == 3


def test_parse_data_spec_imagefolder(tmp_path):
    root = tmp_path / "folder"
    _image_tree(root / "train", per_class=3)
    _image_tree(root / "test", per_class=1)
    spec = data.parse_data_spec(f"imagefolder:{root}")
    splits = spec.datasets()
    assert (len(splits.train), splits.val, len(splits.test), splits.num_classes) == (6, None, 2, 2)
    _image_tree(root / "val", per_class=2)
    splits = spec.datasets(final=True)
    assert len(splits.train) == 10 and splits.val is None
    _image_tree(root / "test", classes=("cat", "dog", "eel"), per_class=1)
    with pytest.raises(ValueError, match="same class folders"):
        spec.dataset("test")


@pytest.mark.parametrize("bad", ["", "pocket-vtab", "cifar:x", "vtab1k:", "pocket-vtab:", "imagenet:/data"])
def test_parse_data_spec_bad(bad):
    with pytest.raises(ValueError, match="pocket-vtab:TASK, vtab1k:DIR, imagefolder:DIR"):
        data.parse_data_spec(bad)


def test_parse_data_spec_bad_target(tmp_path):
    with pytest.raises(ValueError, match="valid tasks: digits"):
        data.parse_data_spec("pocket-vtab:mnist")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.parse_data_spec(f"vtab1k:{tmp_path / 'nowhere'}")


def test_package_not_imported_eagerly():
    code = "import sys, fpet_kernels; assert 'fpet_kernels.data' not in sys.modules"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
