"""Tests of mpiqsgd.train.data (the package): loaders, cache, resolution, splits, sharding, batching."""

from __future__ import annotations

import codecs
import hashlib
import os
import pickle
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mpiqsgd.errors import ConfigError, MpiqsgdError
from mpiqsgd.train import data as D
from mpiqsgd.train.data import cifar10, imagefolder, sources, splits

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = REPO_ROOT / ".." / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
CIFAR_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip

# Created in this (unsorted) order; labels must follow sorted order: ant=0, moose=1, zebra=2.
TREE_CLASSES = ["zebra", "ant", "moose"]
SORTED_CLASSES = sorted(TREE_CLASSES)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(D.CACHE_ENV_VAR, str(tmp_path / "env-cache"))


def _pixels(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def make_tree(root: Path, fmt: str = "png", n_train: int = 4, n_test: int = 2, size: int = 8):
    """Writes an image folder; returns {split: {class: [pixels in sorted-name order]}}."""
    expected: dict[str, dict[str, list[np.ndarray]]] = {}
    seed = 0
    for split, count in (("train", n_train), ("test", n_test)):
        expected[split] = {}
        for cls in TREE_CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True)
            items = []
            for i in reversed(range(count)):  # written out of order on purpose
                seed += 1
                px = _pixels(seed, size)
                Image.fromarray(px).save(folder / f"{i:04d}.{fmt}")
                items.append((i, px))
            expected[split][cls] = [px for _, px in sorted(items, key=lambda t: t[0])]
    return expected


def make_tar(src: Path, dest: Path, wrap: str | None = None) -> Path:
    mode = "w:gz" if dest.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(dest, mode) as tar:  # members in unsorted order, like some archivers
        for split in ("test", "train"):
            for cls_dir in sorted((src / split).iterdir(), reverse=True):
                for file in sorted(cls_dir.iterdir(), reverse=True):
                    name = f"{split}/{cls_dir.name}/{file.name}"
                    tar.add(file, arcname=f"{wrap}/{name}" if wrap else name)
    return dest


def check_tree(train: D.ImageArrays, test: D.ImageArrays, expected, exact: bool = True) -> None:
    for arrays, split in ((train, "train"), (test, "test")):
        assert arrays.classes == SORTED_CLASSES
        want_images = [px for cls in SORTED_CLASSES for px in expected[split][cls]]
        want_labels = [i for i, cls in enumerate(SORTED_CLASSES) for _ in expected[split][cls]]
        assert arrays.images.dtype == np.uint8 and arrays.labels.dtype == np.int64
        assert arrays.images.shape == (len(want_images),) + want_images[0].shape
        assert arrays.labels.tolist() == want_labels
        if exact:
            np.testing.assert_array_equal(arrays.images, np.stack(want_images))


# ---------------------------------------------------------------------- image folders


def test_image_folder_directory_png_roundtrip(tmp_path):
    expected = make_tree(tmp_path / "tree")
    train, test = D.load_image_folder(tmp_path / "tree")
    check_tree(train, test, expected)
    assert len(train) == 12 and len(test) == 6 and train.num_classes == 3


@pytest.mark.parametrize(
    "name, wrap",
    [("flat.tar.gz", None), ("wrapped.tar.gz", "cifar-like"), ("plain.tar", "top"),
     ("short.tgz", None), ("dotted.tar.gz", ".")],
)  # fmt: skip
def test_image_folder_archive(tmp_path, name, wrap):
    expected = make_tree(tmp_path / "tree")
    archive = make_tar(tmp_path / "tree", tmp_path / name, wrap)
    train, test = D.load_image_folder(archive)
    check_tree(train, test, expected)


def test_image_folder_directory_with_wrapping_folder(tmp_path):
    expected = make_tree(tmp_path / "outer" / "inner")
    train, test = D.load_image_folder(tmp_path / "outer")
    check_tree(train, test, expected)


def test_image_folder_jpeg_is_close(tmp_path):
    root = tmp_path / "jpg"
    for split in ("train", "test"):
        for cls in ("b", "a"):
            (root / split / cls).mkdir(parents=True)
            px = np.full((32, 32, 3), 40 if cls == "a" else 200, dtype=np.uint8)
            Image.fromarray(px).save(root / split / cls / "x.jpeg", quality=95)
    train, test = D.load_image_folder(make_tar(root, tmp_path / "jpg.tar.gz"))
    assert train.images.shape == (2, 32, 32, 3)
    assert train.labels.tolist() == [0, 1] and train.classes == ["a", "b"]
    assert abs(train.images[0].astype(int) - 40).max() <= 3
    assert abs(test.images[1].astype(int) - 200).max() <= 3


def test_image_folder_limit_per_class(tmp_path):
    expected = make_tree(tmp_path / "tree")
    archive = make_tar(tmp_path / "tree", tmp_path / "a.tar.gz")
    train, test = D.load_image_folder(archive, limit_per_class=1)
    assert train.labels.tolist() == [0, 1, 2] and test.labels.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(train.images[2], expected["train"]["zebra"][0])
    with pytest.raises(ConfigError):
        D.load_image_folder(archive, limit_per_class=0)


def test_image_folder_errors(tmp_path):
    with pytest.raises(MpiqsgdError, match="does not exist"):
        D.load_image_folder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MpiqsgdError, match="not an image folder"):
        D.load_image_folder(tmp_path / "empty")
    only_train = tmp_path / "only_train" / "train" / "c"
    only_train.mkdir(parents=True)
    Image.fromarray(_pixels(1)).save(only_train / "a.png")
    with pytest.raises(MpiqsgdError, match="test"):
        D.load_image_folder(tmp_path / "only_train")
    mixed = tmp_path / "mixed"
    make_tree(mixed)
    Image.fromarray(_pixels(2, size=9)).save(mixed / "train" / "ant" / "9999.png")
    with pytest.raises(MpiqsgdError, match="share one size"):
        D.load_image_folder(mixed)
    broken = tmp_path / "broken"
    make_tree(broken)
    (broken / "test" / "ant" / "0000.png").write_bytes(b"not a png")
    with pytest.raises(MpiqsgdError, match="cannot decode"):
        D.load_image_folder(broken)


# ------------------------------------------------------------------ CIFAR-10 batches


def make_batches(folder: Path, per_batch: int = 3, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Writes a fake cifar-10-batches-py folder; returns (train data, labels, test ...)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    datas, labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        lab = rng.integers(0, 10, per_batch).tolist()
        batch = {b"batch_label": f"training batch {i} of 5".encode(), b"labels": lab,
                 b"data": data, b"filenames": [b"f.png"] * per_batch}  # fmt: skip
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
        datas.append(data)
        labels += lab
    test_data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 10, per_batch).tolist()
    test = {b"batch_label": b"testing batch 1 of 1", b"labels": test_labels,
            b"data": test_data, b"filenames": [b"t.png"] * per_batch}  # fmt: skip
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in CIFAR_CLASSES],
            b"num_vis": 3072}  # fmt: skip
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return np.concatenate(datas), np.array(labels), test_data, np.array(test_labels)


def check_batches(train, test, expected) -> None:
    data, labels, test_data, test_labels = expected
    assert train.images.shape == (len(data), 32, 32, 3) and test.images.shape[1:] == (32, 32, 3)
    assert train.classes == CIFAR_CLASSES == test.classes
    np.testing.assert_array_equal(train.labels, labels)
    np.testing.assert_array_equal(test.labels, test_labels)
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major.
    n, y, x, c = 4, 5, 7, 2
    assert train.images[n, y, x, c] == data[n, c * 1024 + y * 32 + x]
    np.testing.assert_array_equal(test.images[:, :, :, 1].reshape(len(test_data), -1),
                                  test_data[:, 1024:2048])  # fmt: skip


def test_cifar10_batches_dir_and_parent(tmp_path):
    expected = make_batches(tmp_path / "cifar-10-batches-py")
    for root in (tmp_path / "cifar-10-batches-py", tmp_path):
        check_batches(*D.load_cifar10_batches(root), expected)
    assert D.load_cifar10(tmp_path)[0].images.shape == (15, 32, 32, 3)


def test_cifar10_batches_from_torchvision_archive(tmp_path):
    expected = make_batches(tmp_path / "src" / "cifar-10-batches-py")
    data_dir = tmp_path / "dl"
    data_dir.mkdir()
    with tarfile.open(data_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    check_batches(*D.load_cifar10_batches(data_dir), expected)
    source = D.find_dataset("cifar10", data_dir)
    assert source.kind == "cifar10-batches" and source.path.name == "cifar-10-python.tar.gz"
    check_batches(*D.load_dataset("cifar10", data_dir), expected)


def test_cifar10_batches_missing_or_incomplete(tmp_path):
    with pytest.raises(MpiqsgdError, match="no CIFAR-10 batches"):
        D.load_cifar10_batches(tmp_path)
    make_batches(tmp_path / "cifar-10-batches-py")
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(MpiqsgdError, match="data_batch_3"):
        D.load_cifar10_batches(tmp_path)


def test_batch_file_names_are_torchvisions():
    from torchvision.datasets import CIFAR10

    assert (cifar10.BATCHES_DIR, cifar10.BATCHES_ARCHIVE) == (CIFAR10.base_folder, CIFAR10.filename)
    assert list(cifar10.TRAIN_BATCHES) == [name for name, _ in CIFAR10.train_list]
    assert [cifar10.TEST_BATCH] == [name for name, _ in CIFAR10.test_list]
    assert (cifar10.META_BATCH, "label_names") == (CIFAR10.meta["filename"], CIFAR10.meta["key"])


def test_damaged_batch_file_is_told_apart_by_torchvisions_checksum(tmp_path, monkeypatch):
    make_batches(tmp_path / "cifar-10-batches-py")
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:100])  # a truncated copy
    with pytest.raises(MpiqsgdError, match="cannot read data_batch_2 .*not the official file .*MD5"):
        D.load_cifar10_batches(tmp_path)
    monkeypatch.setattr(cifar10, "_official_md5", lambda name: hashlib.md5(path.read_bytes()).hexdigest())
    with pytest.raises(MpiqsgdError, match="cannot read data_batch_2") as info:  # official yet unreadable
        D.load_cifar10_batches(tmp_path)
    assert "official" not in str(info.value)


# ---------------------------------------------------------------------------- cache


def test_cache_second_load_does_not_decode(tmp_path, monkeypatch):
    expected = make_tree(tmp_path / "tree")
    archive = make_tar(tmp_path / "tree", tmp_path / "tree.tar.gz", wrap="w")
    cache_dir = tmp_path / "cache"
    calls = []
    real_decode = D.decode_image

    def counting(data):
        calls.append(1)
        return real_decode(data)

    monkeypatch.setattr(imagefolder, "decode_image", counting)
    first = D.load_image_folder(archive, cache=True, cache_dir=cache_dir)
    assert len(calls) == 18
    files = sorted(p.name for p in cache_dir.iterdir())
    assert [f for f in files if f.endswith(".npz")] and not [f for f in files if ".tmp" in f]

    def refuse(data):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(imagefolder, "decode_image", refuse)
    second = D.load_image_folder(archive, cache=True, cache_dir=cache_dir)
    check_tree(*second, expected)
    np.testing.assert_array_equal(first[0].images, second[0].images)

    # A changed source (new size and mtime) is a new cache entry: decoded again.
    make_tar(tmp_path / "tree", archive, wrap="other-name")
    os.utime(archive, ns=(1_000_000_000, 1_000_000_000))
    monkeypatch.setattr(imagefolder, "decode_image", counting)
    calls.clear()
    D.load_image_folder(archive, cache=True, cache_dir=cache_dir)
    assert len(calls) == 18


def test_cache_env_var_and_corrupt_entry(tmp_path, monkeypatch):
    make_tree(tmp_path / "data" / "cifar10")
    monkeypatch.setenv(D.CACHE_ENV_VAR, str(tmp_path / "envcache"))
    assert D.default_cache_dir() == tmp_path / "envcache"
    train, _ = D.load_dataset("cifar10", tmp_path / "data")
    (entry,) = (tmp_path / "envcache").glob("*.npz")
    entry.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        again, _ = D.load_dataset("cifar10", tmp_path / "data")
    np.testing.assert_array_equal(train.images, again.images)
    monkeypatch.delenv(D.CACHE_ENV_VAR)
    assert D.default_cache_dir() == Path.home() / ".cache" / "mpiqsgd"


def test_cache_is_decoded_once_by_concurrent_loaders(tmp_path, monkeypatch):
    expected = make_tree(tmp_path / "tree")
    calls = []
    real_decode = D.decode_image

    def slow(data):
        calls.append(1)
        time.sleep(0.005)  # widen the window in which an unlocked second loader would decode too
        return real_decode(data)

    monkeypatch.setattr(imagefolder, "decode_image", slow)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: D.load_image_folder(tmp_path / "tree", cache=True,
                                                              cache_dir=tmp_path / "cache"), range(3)))
    assert len(calls) == 18
    for train, test in results:
        check_tree(train, test, expected)
    (entry,) = (tmp_path / "cache").glob("*.npz")
    umask = os.umask(0)
    os.umask(umask)
    assert entry.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plainly created file, not mkstemp's 0600


def test_cache_that_cannot_be_written_only_warns(tmp_path):
    expected = make_tree(tmp_path / "tree")
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.warns(UserWarning, match="could not write dataset cache"):
        train, test = D.load_image_folder(tmp_path / "tree", cache=True, cache_dir=tmp_path / "a-file" / "cache")
    check_tree(train, test, expected)


# ----------------------------------------------------------------------- resolution


def test_missing_data_names_places_and_flags(tmp_path):
    nothing = tmp_path / "nothing"
    with pytest.raises(MpiqsgdError) as info:
        D.load_dataset("cifar10", data_dir=nothing)
    msg = str(info.value)
    assert str(nothing) in msg and "--data-dir" in msg and "--download" in msg
    assert "--dataset synthetic" in msg


def test_missing_data_in_default_places(tmp_path, monkeypatch):
    places = [tmp_path / "a", tmp_path / "b"]
    (tmp_path / "b").mkdir()
    monkeypatch.setattr(sources, "default_data_dirs", lambda cache_dir=None: places)
    with pytest.raises(MpiqsgdError) as info:
        D.find_dataset("cifar10", None)
    assert all(str(p) in str(info.value) for p in places)


def test_default_data_dirs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dirs = [os.path.abspath(p) for p in D.default_data_dirs(cache_dir=tmp_path / "c")]
    assert dirs[0] == str(tmp_path / "data")
    assert os.path.abspath(tmp_path / ".." / "shared" / "datasets") in dirs
    assert str(tmp_path / "c" / "data") == dirs[-1]
    monkeypatch.setattr(sources, "default_data_dirs", lambda cache_dir=None: [Path("data")])
    expected = make_batches(tmp_path / "data" / "cifar-10-batches-py")
    check_batches(*D.load_dataset("cifar10"), expected)


def test_find_dataset_kinds(tmp_path):
    make_tree(tmp_path / "folder")
    assert D.find_dataset("cifar10", tmp_path / "folder").kind == "image-folder"
    archive_dir = tmp_path / "archives"
    archive_dir.mkdir()
    (archive_dir / "unrelated.tar.gz").write_bytes(b"not a tar")
    make_tar(tmp_path / "folder", archive_dir / "mydata.tar.gz", wrap="x")
    source = D.find_dataset("CIFAR10", archive_dir)
    assert (source.kind, source.path.name) == ("image-folder", "mydata.tar.gz")
    assert source.path.is_absolute()
    assert D.find_dataset("cifar10", archive_dir / "mydata.tar.gz").kind == "image-folder"
    assert D.find_dataset("synthetic").kind == "synthetic"


def test_unknown_dataset_lists_choices():
    with pytest.raises(ConfigError) as info:
        D.load_dataset("imagenet", None)
    assert "cifar10" in str(info.value) and "synthetic" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_download_failure_is_wrapped(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(cifar10, "_torchvision_cifar10", lambda: offline)
    with pytest.raises(MpiqsgdError) as info:
        D.load_dataset("cifar10", tmp_path / "dl", download=True)
    msg = str(info.value)
    assert "network is unreachable" in msg and "--data-dir" in msg
    assert "put cifar-10-python.tar.gz, cifar-10-batches-py/ or an image folder " in msg
    assert f"into {tmp_path / 'dl'} yourself" in msg


def test_download_success_path(tmp_path, monkeypatch):
    calls = []

    def fake_cifar10(root, train, download):
        calls.append((root, train, download))
        if not (Path(root) / "cifar-10-batches-py").exists():
            make_batches(Path(root) / "cifar-10-batches-py")

    monkeypatch.setattr(cifar10, "_torchvision_cifar10", lambda: fake_cifar10)
    train, test = D.load_dataset("cifar10", tmp_path / "dl", download=True)
    assert len(train) == 15 and len(test) == 3 and calls[0][2] is True
    assert len(calls) == 1  # one archive holds both splits
    calls.clear()
    D.load_dataset("cifar10", tmp_path / "dl", download=True)  # found: no second download
    assert calls == []


# ------------------------------------------------------------------------ synthetic


def test_synthetic_deterministic_balanced_learnable():
    a_train, a_test = D.make_synthetic(2000, 500, seed=3)
    b_train, b_test = D.make_synthetic(2000, 500, seed=3)
    np.testing.assert_array_equal(a_train.images, b_train.images)
    np.testing.assert_array_equal(a_test.labels, b_test.labels)
    c_train, _ = D.make_synthetic(2000, 500, seed=4)
    assert not np.array_equal(a_train.images, c_train.images)
    assert a_train.images.shape == (2000, 32, 32, 3) and a_train.images.dtype == np.uint8
    assert np.bincount(a_train.labels, minlength=10).tolist() == [200] * 10
    counts = np.bincount(a_test.labels, minlength=10)
    assert counts.min() >= 50 and counts.max() <= 50
    # Nearest class mean already beats chance (10%) by far: the task is learnable.
    flat = a_train.images.reshape(2000, -1).astype(np.float32)
    means = np.stack([flat[a_train.labels == c].mean(0) for c in range(10)])
    test_flat = a_test.images.reshape(500, -1).astype(np.float32)
    pred = ((test_flat[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == a_test.labels).mean() > 0.4
    tr, te = D.load_dataset("synthetic", None, synthetic_train=30, synthetic_test=10, seed=1)
    assert len(tr) == 30 and len(te) == 10
    small, _ = D.make_synthetic(7, 0, num_classes=3, image_size=16)
    assert small.images.shape == (7, 16, 16, 3) and small.num_classes == 3


# ----------------------------------------------------------------------- splitting


def _labels_only(labels) -> D.ImageArrays:
    labels = np.asarray(labels)
    images = (np.arange(len(labels)) % 256).astype(np.uint8).reshape(-1, 1, 1, 1)
    return D.ImageArrays(np.repeat(images, 3, axis=3), labels, [str(i) for i in range(10)])


def test_split_train_val_cifar_sizes():
    full = _labels_only(np.repeat(np.arange(10), 5000))
    train, val = D.split_train_val(full, 0.1, seed=0)
    assert (len(train), len(val)) == (45_000, 5_000)
    assert np.bincount(val.labels).tolist() == [500] * 10


def test_split_train_val_deterministic():
    labels = np.random.default_rng(0).integers(0, 10, 1234)
    images = np.random.default_rng(1).integers(0, 256, (1234, 2, 2, 3), dtype=np.uint8)
    full = D.ImageArrays(images, labels, [str(i) for i in range(10)])
    train, val = D.split_train_val(full, 0.1, seed=5)
    assert len(val) == 123 and len(train) == 1111
    train2, val2 = D.split_train_val(full, 0.1, seed=5)
    np.testing.assert_array_equal(val.images, val2.images)
    np.testing.assert_array_equal(train.labels, train2.labels)
    _, val3 = D.split_train_val(full, 0.1, seed=6)
    assert not np.array_equal(val.images, val3.images)


def test_split_indices_partition():
    labels = np.random.default_rng(1).integers(0, 10, 997)
    picked = splits._stratified_pick(labels, 100, np.random.default_rng(0))
    assert len(picked) == 100 == len(np.unique(picked))
    rest = np.setdiff1d(np.arange(997), picked)
    assert len(rest) + len(picked) == 997
    proportions = np.bincount(labels[picked], minlength=10) / 100
    assert np.abs(proportions - np.bincount(labels, minlength=10) / 997).max() <= 0.011
    with pytest.raises(ConfigError):
        D.split_train_val(_labels_only(labels % 10), 1.0)
    assert len(D.split_train_val(_labels_only(labels % 10), 0.0)[1]) == 0


def test_split_train_val_disjoint_union():
    n = 600
    images = np.zeros((n, 2, 2, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 0, 1] = np.arange(n) // 256  # (ch0, ch1) identifies each sample
    labels = np.arange(n) % 10
    train, val = D.split_train_val(D.ImageArrays(images, labels, list("abcdefghij")), 0.1, 2)
    t, v = (a.images[:, 0, 0, 0] + 256 * a.images[:, 0, 0, 1].astype(int) for a in (train, val))
    assert len(v) == 60 and not set(t) & set(v) and sorted(set(t) | set(v)) == list(range(n))
    np.testing.assert_array_equal(train.labels, labels[t])
    assert np.all(np.diff(t) > 0)


def test_subset():
    labels = np.arange(1000) % 10
    full = _labels_only(labels)
    a = D.subset(full, 100, seed=1)
    b = D.subset(full, 100, seed=1)
    assert len(a) == 100 and np.bincount(a.labels).tolist() == [10] * 10
    np.testing.assert_array_equal(a.images, b.images)
    assert len(D.subset(full, 1000)) == 1000
    for bad in (0, 1001):
        with pytest.raises(ConfigError):
            D.subset(full, bad)


# ---------------------------------------------------------------------- tensor side


def test_to_tensor_normalizes():
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    x = D.to_tensor(images)
    assert x.shape == (5, 3, 4, 6) and x.dtype == torch.float32 and x.is_contiguous()
    mean, std = np.array(D.CIFAR10_MEAN), np.array(D.CIFAR10_STD)
    want = (images / 255.0 - mean) / std
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), want, rtol=1e-5, atol=1e-5)
    assert D.CIFAR10_MEAN == (0.4914, 0.4822, 0.4465)
    assert D.CIFAR10_STD == (0.2470, 0.2435, 0.2616)
    with pytest.raises(ConfigError):
        D.to_tensor(images.astype(np.float32))


def _batch(n=16, c=3, h=8, w=8, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed)) + 1.0


def test_augment_shape_and_determinism():
    batch = _batch()
    out1 = D.augment(batch, torch.Generator().manual_seed(7))
    out2 = D.augment(batch, torch.Generator().manual_seed(7))
    out3 = D.augment(batch, torch.Generator().manual_seed(8))
    assert out1.shape == batch.shape and out1.dtype == batch.dtype
    assert torch.equal(out1, out2) and not torch.equal(out1, out3)
    assert torch.equal(batch, _batch())  # input untouched


def test_augment_flip_only_is_identity_or_mirror():
    batch = _batch(n=64)
    out = D.augment(batch, torch.Generator().manual_seed(0), padding=0)
    same = (out == batch).flatten(1).all(1)
    mirrored = (out == batch.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 10 < int(mirrored.sum()) < 54 and 10 < int(same.sum()) < 54
    assert torch.equal(D.augment(batch, torch.Generator(), padding=0, flip=False), batch)


def test_augment_crop_is_window_of_padded_image():
    batch = _batch(n=32)
    out = D.augment(batch, torch.Generator().manual_seed(1), padding=4, flip=False)
    padded = torch.nn.functional.pad(batch, (4, 4, 4, 4))
    offsets = set()
    for i in range(len(batch)):
        hits = [(dy, dx) for dy in range(9) for dx in range(9)
                if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]  # fmt: skip
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 10  # offsets vary per sample
    values_ok = (out == 0) | (out >= 1.0)  # zeros from padding, else original (>= 1) values
    assert bool(values_ok.all()) and bool((out == 0).any())


def test_shard_indices():
    n, world = 103, 4
    shards = [D.shard_indices(n, r, world, epoch=2, seed=9) for r in range(world)]
    assert all(len(s) == 25 and s.dtype == np.int64 for s in shards)
    union = np.concatenate(shards)
    assert len(np.unique(union)) == 100
    perm = np.random.default_rng([9, 2]).permutation(n)
    np.testing.assert_array_equal(union, perm[:100])
    np.testing.assert_array_equal(shards[1], D.shard_indices(n, 1, world, epoch=2, seed=9))
    assert not np.array_equal(shards[1], D.shard_indices(n, 1, world, epoch=3, seed=9))
    assert not np.array_equal(shards[1], D.shard_indices(n, 1, world, epoch=2, seed=10))
    assert sorted(D.shard_indices(7, 0, 1, epoch=0)) == list(range(7))
    for args in ((10, 4, 4, 0), (10, -1, 4, 0), (3, 0, 4, 0), (10, 0, 0, 0)):
        with pytest.raises(ConfigError):
            D.shard_indices(*args)
    assert D.steps_per_epoch(103, 4, 8) == 3


def test_iterate_batches_order_drop_last_and_resume():
    n = 40
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    labels = torch.arange(n, dtype=torch.int64) % 10
    indices = np.random.default_rng(0).permutation(n)[:30]
    plain = list(D.iterate_batches(images, labels, indices, 8, augment=False))
    assert len(plain) == 3  # 30 // 8, last 6 dropped
    for b, (x, y) in enumerate(plain):
        sel = indices[b * 8 : (b + 1) * 8]
        assert x.shape == (8, 1, 4, 4)
        assert x[:, 0, 0, 0].long().tolist() == sel.tolist()
        assert y.tolist() == (sel % 10).tolist()
    resumed = list(D.iterate_batches(images, labels, indices, 8, augment=False, start_batch=2))
    assert len(resumed) == 1 and torch.equal(resumed[0][0], plain[2][0])

    gen = torch.Generator().manual_seed(3)
    full = []
    state_after_first = None
    for b, (x, _) in enumerate(D.iterate_batches(images, labels, indices, 8, gen)):
        full.append(x)
        if b == 0:
            state_after_first = gen.get_state()
    gen2 = torch.Generator()
    gen2.set_state(state_after_first)
    rest = [x for x, _ in D.iterate_batches(images, labels, indices, 8, gen2, start_batch=1)]
    assert all(torch.equal(a, b) for a, b in zip(rest, full[1:])) and len(rest) == 2
    with pytest.raises(ConfigError):
        next(D.iterate_batches(images, labels, indices, 8, None))
    with pytest.raises(ConfigError):
        next(D.iterate_batches(images, labels, indices, 8, augment=False, start_batch=4))
    with pytest.raises(ConfigError):
        next(D.iterate_batches(images, labels, [0, 41], 1, augment=False))


# --------------------------------------------------------------- real shared archive


@pytest.mark.skipif(not SHARED_ARCHIVE.is_file(), reason="shared CIFAR-10 archive not present")
def test_shared_cifar10_archive_first_images():
    train, test = D.load_image_folder(SHARED_ARCHIVE, limit_per_class=2)
    assert train.classes == CIFAR_CLASSES
    assert train.images.shape == (20, 32, 32, 3) and test.images.shape == (20, 32, 32, 3)
    assert train.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert 20 < train.images.mean() < 235 and train.images.std() > 10
    source = D.find_dataset("cifar10", SHARED_ARCHIVE.parent)
    assert source.kind == "image-folder" and source.path.name == "cifar10-jpeg.tar.gz"


# ------------------------------------------------------------------ hostile batch files


class _Runs:
    """Pickles as a call of ``fn(*args)``: what a crafted batch file would do."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("payload,named", [
    (lambda marker: _Runs(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
    (lambda marker: {b"data": _Runs(eval, f"open({str(marker)!r}, 'w')")}, "(__builtin__|builtins).eval"),
    (lambda marker: [_Runs(getattr, _Runs(__import__, "os"), "system")], "(__builtin__|builtins).getattr"),
    (lambda marker: _Runs(pickle.loads, b"x"), "_?pickle.loads"),
    (lambda marker: _Runs(np.load, str(marker)), "numpy.load"),
])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_batch_file_that_would_run_code_is_refused_without_running(tmp_path, payload, named, protocol):
    make_batches(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "ran"
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(payload(marker), protocol))
    with pytest.raises(MpiqsgdError, match=f"refusing data_batch_3 in .*its pickle calls {named}, which"):
        D.load_cifar10_batches(tmp_path)
    assert not marker.exists()


def test_batch_files_of_python_2_and_numpy_1_still_load(tmp_path):
    expected = make_batches(tmp_path / "cifar-10-batches-py")
    for name in ("data_batch_1", "test_batch"):  # as the real files name the numpy 1 module
        path = tmp_path / "cifar-10-batches-py" / name
        path.write_bytes(path.read_bytes().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    check_batches(*D.load_cifar10_batches(tmp_path), expected)
    bad = pickle.dumps(_Runs(codecs.encode, "x" * 100, "zlib_codec"), protocol=2)  # allowed for latin-1 only
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(bad)
    with pytest.raises(MpiqsgdError, match="cannot read test_batch .*'zlib_codec' is not allowed"):
        D.load_cifar10_batches(tmp_path)
