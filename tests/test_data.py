"""Tests of the data package: metadata, loading, batching, download and synthetic3d (offline, fast)."""

from __future__ import annotations

import io
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from data.info import medmnist_info_table
from data import download as download_module
from data import info as info_module
from data import DATASET_NAMES, DataError, Split, batches, data_md5, dataset_info, file_md5, load_splits
from helpers import write_fake_medmnist

MEDMNIST_NAMES = [name for name in DATASET_NAMES if name.endswith("3d") and name != "synthetic3d"]  # 2D: test_data2d.py


class FakeResponse(io.BytesIO):
    """Stands in for the object `urllib.request.urlopen` returns."""

    def __init__(self, payload: bytes) -> None:
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


def npz_bytes(tmp_path: Path, name: str = "adrenalmnist3d") -> bytes:
    """Bytes of a small valid fake file for `name`."""
    return write_fake_medmnist(tmp_path / "source", name).read_bytes()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")) if root.exists() else []


# --- metadata ---------------------------------------------------------------------------------


def test_dataset_names():
    # MedMNIST v2's 3D and 2D flags, as its INFO table lists them, and the two built-in datasets
    assert set(DATASET_NAMES) == {
        "organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d", "vesselmnist3d",
        "synapsemnist3d", "synthetic3d", "synthetic2d", *(set(medmnist_info_table()) - {
            "organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d", "vesselmnist3d", "synapsemnist3d"}),
    }
    assert len(DATASET_NAMES) == 20


@pytest.mark.parametrize("name", MEDMNIST_NAMES)
@pytest.mark.parametrize("size", [28, 64])
def test_info_matches_medmnist(name, size, tmp_path):
    from medmnist.info import INFO

    entry = INFO[name]
    info = dataset_info(name, size=size, root=tmp_path)
    assert info.name == name and info.size == size
    assert info.task == entry["task"]
    assert info.num_classes == len(entry["label"])
    assert info.in_channels == entry["n_channels"] == 1
    assert info.label_names == entry["label"]
    assert info.n_samples == entry["n_samples"]
    suffix = "" if size == 28 else "_64"
    assert info.url == entry[f"url{suffix}"]
    assert info.md5 == entry[f"MD5{suffix}"]
    assert info.path == tmp_path / f"{name}{suffix}.npz"


def test_info_known_values():
    assert dataset_info("organmnist3d").num_classes == 11
    assert dataset_info("organmnist3d").task == "multi-class"
    assert dataset_info("adrenalmnist3d").num_classes == 2
    assert dataset_info("adrenalmnist3d").task == "binary-class"
    assert dataset_info("adrenalmnist3d").md5 == "bbd3c5a5576322bc4cdfea780653b1ce"
    assert dataset_info("adrenalmnist3d").path is None  # no root given


def test_info_root_expands_user():
    info = dataset_info("vesselmnist3d", size=64, root="~/medmnist-data")
    assert info.path == Path.home() / "medmnist-data" / "vesselmnist3d_64.npz"


def test_info_synthetic():
    info = dataset_info("synthetic3d", size=64, root="/anywhere")
    assert (info.task, info.num_classes, info.in_channels, info.size) == ("multi-class", 3, 1, 64)
    assert info.n_samples == {"train": 240, "val": 60, "test": 60}
    assert info.path is None and info.url is None and info.md5 is None


def test_unknown_name_suggests_close_one():
    with pytest.raises(DataError) as excinfo:
        dataset_info("adrenalmnist")
    message = str(excinfo.value)
    assert "Did you mean 'adrenalmnist3d'" in message
    assert all(name in message for name in DATASET_NAMES)


def test_unsupported_size():
    with pytest.raises(DataError, match="size 32"):
        dataset_info("organmnist3d", size=32)


# --- loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [28, 64])
def test_load_shapes_dtypes_and_order(size, tmp_path):
    path = write_fake_medmnist(tmp_path, "organmnist3d", size=size, n=(8, 4, 3))
    with pytest.warns(UserWarning, match="organmnist3d"):
        splits = load_splits("organmnist3d", root=tmp_path, size=size, download=False)
    stored = np.load(path)
    assert list(splits) == ["train", "val", "test"]
    for split, count in zip(("train", "val", "test"), (8, 4, 3)):
        s = splits[split]
        assert isinstance(s, Split) and len(s) == count
        assert s.images.dtype == torch.uint8 and s.images.shape == (count, 1, size, size, size)
        assert s.labels.dtype == torch.int64 and s.labels.shape == (count,)
        # Same order, same axis order, just a channel axis added.
        assert np.array_equal(s.images[:, 0].numpy(), stored[f"{split}_images"])
        assert np.array_equal(s.labels.numpy(), stored[f"{split}_labels"][:, 0])


def test_small_file_warns_once_naming_the_file(tmp_path):
    path = write_fake_medmnist(tmp_path, "adrenalmnist3d")
    with pytest.warns(UserWarning) as record:
        load_splits("adrenalmnist3d", root=tmp_path, download=False)
    assert len(record) == 1 and str(path) in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_splits("adrenalmnist3d", root=tmp_path, download=False)


def test_official_sizes_load_quietly(tmp_path):  # load speed: tools/benchmark.py, not a timed test
    write_fake_medmnist(tmp_path, "adrenalmnist3d", n="official")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splits = load_splits("adrenalmnist3d", root=tmp_path, download=False)
    assert {k: len(v) for k, v in splits.items()} == dataset_info("adrenalmnist3d").n_samples


def test_load_selected_splits(tmp_path):
    write_fake_medmnist(tmp_path, "nodulemnist3d", n=(5, 4, 3))
    with pytest.warns(UserWarning):
        splits = load_splits("nodulemnist3d", root=tmp_path, download=False, splits=("test",))
    assert list(splits) == ["test"] and len(splits["test"]) == 3
    with pytest.raises(DataError, match="'dev'"):
        load_splits("nodulemnist3d", root=tmp_path, download=False, splits=("dev",))


def test_split_to_device():
    split = Split(torch.zeros(2, 1, 28, 28, 28, dtype=torch.uint8), torch.tensor([0, 1]))
    moved = split.to("cpu")
    assert len(moved) == 2 and moved.images.dtype == torch.uint8 and moved.labels.device.type == "cpu"


# --- batches ----------------------------------------------------------------------------------


def make_split(n: int = 8, size: int = 4) -> Split:
    images = torch.arange(n * size**3, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(n, 1, size, size, size)
    return Split(images, torch.arange(n, dtype=torch.int64))


def test_batches_in_order_with_last_partial_batch():
    split = make_split(8)
    out = list(batches(split, 3))
    assert [len(y) for _, y in out] == [3, 3, 2]
    assert torch.equal(torch.cat([y for _, y in out]), torch.arange(8))
    x = torch.cat([x for x, _ in out])
    assert x.dtype == torch.float32 and x.shape == (8, 1, 4, 4, 4)
    assert torch.equal(x, split.images.float() / 255)
    assert x.min() >= 0 and x.max() <= 1 and x.max() == 1.0


def test_batches_drop_last():
    assert [len(y) for _, y in batches(make_split(8), 3, drop_last=True)] == [3, 3]
    assert [len(y) for _, y in batches(make_split(6), 3, drop_last=True)] == [3, 3]
    assert list(batches(make_split(2), 3, drop_last=True)) == []


def test_batches_shuffle_is_deterministic_with_a_seeded_generator():
    split = make_split(10)
    first = [y for _, y in batches(split, 4, shuffle=True, generator=torch.Generator().manual_seed(7))]
    second = [y for _, y in batches(split, 4, shuffle=True, generator=torch.Generator().manual_seed(7))]
    other = [y for _, y in batches(split, 4, shuffle=True, generator=torch.Generator().manual_seed(8))]
    order = torch.cat(first)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(order, torch.cat(other))
    assert torch.equal(order, torch.randperm(10, generator=torch.Generator().manual_seed(7)))
    assert [len(y) for y in first] == [4, 4, 2]
    # Images travel with their labels.
    for x, y in batches(split, 4, shuffle=True, generator=torch.Generator().manual_seed(7)):
        assert torch.equal(x, split.images[y].float() / 255)


def test_batches_rejects_bad_batch_size():
    with pytest.raises(ValueError):
        list(batches(make_split(4), 0))


# --- missing files and downloads ----------------------------------------------------------------


def assert_manual_guidance(message: str, name: str, root: Path) -> None:
    info = dataset_info(name, root=root)
    assert info.url in message
    assert info.md5 in message
    assert str(root / f"{name}.npz") in message


def test_missing_file_without_download(tmp_path):
    root = tmp_path / "medmnist"
    with pytest.raises(DataError) as excinfo:
        load_splits("adrenalmnist3d", root=root, download=False)
    assert_manual_guidance(str(excinfo.value), "adrenalmnist3d", root)
    assert files_under(tmp_path) == []


def test_offline_download_names_url_md5_and_path_and_writes_nothing(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(download_module, "open_url", offline)
    with pytest.raises(DataError) as excinfo:
        load_splits("adrenalmnist3d", root=tmp_path, download=True)
    message = str(excinfo.value)
    assert message.startswith("Could not download adrenalmnist3d.npz from ")
    assert "name resolution" in message
    assert_manual_guidance(message, "adrenalmnist3d", tmp_path)
    assert files_under(tmp_path) == []


def test_http_error_during_download(tmp_path, monkeypatch):
    def not_found(url, timeout):
        raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)

    monkeypatch.setattr(download_module, "open_url", not_found)
    with pytest.raises(DataError, match="HTTP error 404"):
        load_splits("adrenalmnist3d", root=tmp_path)
    assert files_under(tmp_path) == []


def test_download_file_lands_the_file(tmp_path, monkeypatch):
    payload = npz_bytes(tmp_path)
    md5 = file_md5(tmp_path / "source" / "adrenalmnist3d.npz")
    calls = []

    def serve(url, timeout):
        calls.append((url, timeout))
        return FakeResponse(payload)

    monkeypatch.setattr(download_module, "open_url", serve)
    dest = tmp_path / "root" / "adrenalmnist3d.npz"
    data.download_file("https://example.org/adrenalmnist3d.npz", dest, md5)
    assert dest.read_bytes() == payload
    assert files_under(tmp_path / "root") == [dest]
    assert calls == [("https://example.org/adrenalmnist3d.npz", download_module.DOWNLOAD_TIMEOUT_S)]


def test_load_splits_downloads_a_missing_file(tmp_path, monkeypatch):
    payload = npz_bytes(tmp_path)
    md5 = file_md5(tmp_path / "source" / "adrenalmnist3d.npz")
    monkeypatch.setitem(info_module.medmnist_info_table()["adrenalmnist3d"], "MD5", md5)
    monkeypatch.setattr(download_module, "open_url", lambda url, timeout: FakeResponse(payload))
    root = tmp_path / "root"
    with pytest.warns(UserWarning):
        splits = load_splits("adrenalmnist3d", root=root)
    assert len(splits["train"]) == 8
    assert files_under(root) == [root / "adrenalmnist3d.npz"]
    assert data_md5("adrenalmnist3d", root=root) == md5


def test_wrong_md5_download_leaves_nothing(tmp_path, monkeypatch):
    payload = npz_bytes(tmp_path)
    monkeypatch.setattr(download_module, "open_url", lambda url, timeout: FakeResponse(payload))
    root = tmp_path / "root"
    with pytest.raises(DataError) as excinfo:
        load_splits("adrenalmnist3d", root=root)
    message = str(excinfo.value)
    assert "expected bbd3c5a5576322bc4cdfea780653b1ce" in message
    assert_manual_guidance(message, "adrenalmnist3d", root)
    assert files_under(root) == []


def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch):
    class Broken(FakeResponse):
        def read(self, *args):
            raise TimeoutError("read timed out")

    monkeypatch.setattr(download_module, "open_url", lambda url, timeout: Broken(b"x"))
    with pytest.raises(DataError, match="timed out"):
        load_splits("adrenalmnist3d", root=tmp_path)
    assert files_under(tmp_path) == []


# --- broken files -----------------------------------------------------------------------------


def test_corrupt_file(tmp_path):
    path = tmp_path / "adrenalmnist3d.npz"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError) as excinfo:
        load_splits("adrenalmnist3d", root=tmp_path, download=False)
    message = str(excinfo.value)
    assert str(path) in message and "delete it" in message and "bbd3c5a5576322bc4cdfea780653b1ce" in message


def test_truncated_file(tmp_path):
    path = write_fake_medmnist(tmp_path, "adrenalmnist3d", n=(20, 4, 4))
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError, match="corrupt or truncated") as excinfo:
        load_splits("adrenalmnist3d", root=tmp_path, download=False)
    assert str(path) in str(excinfo.value)


def write_npz(root: Path, name: str, **overrides: np.ndarray) -> Path:
    """A valid small adrenalmnist3d-style file with some arrays replaced (None removes a key)."""
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = np.zeros((4, 28, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.zeros((4, 1), dtype=np.uint8)
    arrays.update(overrides)
    path = root / f"{name}.npz"
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return path


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("train_images", np.zeros((4, 28, 28), dtype=np.uint8), "(4, 28, 28)"),
        ("train_images", np.zeros((4, 32, 32, 32), dtype=np.uint8), "(4, 32, 32, 32)"),
        ("val_images", np.zeros((4, 28, 28, 28), dtype=np.float32), "float32"),
        ("test_labels", np.zeros((4, 2), dtype=np.uint8), "(4, 2)"),
        ("train_labels", np.zeros((3, 1), dtype=np.uint8), "(3, 1)"),
        ("val_labels", np.full((4, 1), 2, dtype=np.uint8), "[0, 1]"),
        ("test_labels", None, "no key test_labels"),
    ],
)
def test_wrong_structure(tmp_path, key, value, expected):
    path = write_npz(tmp_path, "adrenalmnist3d", **{key: value})
    with pytest.raises(DataError) as excinfo:
        load_splits("adrenalmnist3d", root=tmp_path, download=False)
    message = str(excinfo.value)
    assert str(path) in message and key in message and expected in message


def test_64_file_loaded_as_28_is_rejected(tmp_path):
    write_fake_medmnist(tmp_path, "fracturemnist3d", size=64)
    (tmp_path / "fracturemnist3d_64.npz").rename(tmp_path / "fracturemnist3d.npz")
    with pytest.raises(DataError, match="size 28"):
        load_splits("fracturemnist3d", root=tmp_path, download=False)


# --- provenance -------------------------------------------------------------------------------


def test_file_md5_and_data_md5_cache(tmp_path, monkeypatch):
    import hashlib

    path = write_fake_medmnist(tmp_path, "vesselmnist3d")
    assert file_md5(path) == hashlib.md5(path.read_bytes()).hexdigest()
    calls = []
    real = download_module.file_md5
    monkeypatch.setattr(download_module, "file_md5", lambda p: calls.append(p) or real(p))
    first = data_md5("vesselmnist3d", root=tmp_path)
    assert data_md5("vesselmnist3d", root=tmp_path) == first == file_md5(path)
    assert len(calls) == 1
    write_fake_medmnist(tmp_path, "vesselmnist3d", n=(9, 4, 4))  # new content, new size
    assert data_md5("vesselmnist3d", root=tmp_path) == file_md5(path) != first
    assert len(calls) == 2
    assert data_md5("synthetic3d", root=tmp_path) is None


# --- synthetic3d ------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_sized():
    state = torch.random.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    first = load_splits("synthetic3d", root="unused")
    second = load_splits("synthetic3d", root="unused")
    assert torch.equal(state, torch.random.get_rng_state()) and np.array_equal(np_state, np.random.get_state()[1])
    for split, count in {"train": 240, "val": 60, "test": 60}.items():
        s = first[split]
        assert s.images.dtype == torch.uint8 and s.images.shape == (count, 1, 28, 28, 28)
        assert s.labels.dtype == torch.int64 and set(s.labels.tolist()) == {0, 1, 2}
        assert torch.equal(s.images, second[split].images) and torch.equal(s.labels, second[split].labels)
    assert not torch.equal(first["val"].images, first["test"].images)


def test_synthetic_64():
    splits = load_splits("synthetic3d", root="unused", size=64, splits=("val",))
    assert splits["val"].images.shape == (60, 1, 64, 64, 64)


def test_synthetic_class_is_written_along_depth():
    split = load_splits("synthetic3d", root="unused", splits=("train",))["train"]
    volumes = split.images[:, 0].float()  # (N, D, H, W)
    # The number of depth slices that contain the bright object gives the class ...
    extent = (volumes.amax(dim=(2, 3)) > 100).sum(dim=1).float() / volumes.shape[1]  # (N,)
    predicted = torch.bucketize(extent, torch.tensor([0.2, 0.5]))
    assert (predicted == split.labels).float().mean().item() > 0.95
    # ... while one slice through the object looks the same for every class: its bright area does not
    # separate the classes (class means within 15 % of each other).
    area = torch.stack([(v[v.amax(dim=(1, 2)).argmax()] > 100).sum() for v in volumes]).float()
    means = torch.stack([area[split.labels == c].mean() for c in range(3)])
    assert (means.max() / means.min()).item() < 1.15


def test_text_file_named_npz_is_not_called_a_pickle(tmp_path):
    (tmp_path / "adrenalmnist3d.npz").write_text("not an archive\n")
    with pytest.raises(DataError) as err:
        load_splits("adrenalmnist3d", root=tmp_path, download=False)
    assert "not a valid .npz (zip) file" in str(err.value) and "pickle" not in str(err.value)


def test_single_class_training_split_warns(tmp_path, capsys):
    from data import check_split

    info = dataset_info("adrenalmnist3d", root=tmp_path)
    images = torch.zeros((5, 1, 28, 28, 28), dtype=torch.uint8)
    check_split(info, "train", Split(images, torch.tensor([0, 1, 0, 0, 1])), need_all_classes=False)
    assert capsys.readouterr().err == ""
    check_split(info, "train", Split(images, torch.ones(5, dtype=torch.long)), need_all_classes=False)
    err = capsys.readouterr().err
    assert err.startswith("warning: the train split") and "only class 1" in err and err.count("\n") == 1
