"""Data sources: digits, IDX (real MNIST and written files), npz, folder, and every bad-input DataError."""

import gzip
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from cnnjax import data
from cnnjax.data import DataError, idx, sources

MNIST = Path(__file__).parents[2] / "shared" / "datasets" / "mnist"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def cfg_for(name, path="", **fields):
    cfg = data.data_config()
    cfg.name, cfg.path = name, str(path)
    cfg.update(fields)
    return cfg


def load(name, path="", image_size=8, channels=1, **fields):
    return data.load_dataset(
        cfg_for(name, path, **fields), image_size=image_size, channels=channels
    )


def write_idx(
    path: Path, array: np.ndarray, compress: bool = False, magic: bytes | None = None
) -> None:
    header = magic or bytes([0, 0, 0x08, array.ndim])
    raw = header + np.asarray(array.shape, ">u4").tobytes() + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def fake_images(n, size=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def test_digits_is_split_deterministically_and_stratified():
    ds = load("digits")
    sizes = {k: len(v) for k, v in ds.splits.items()}
    assert sum(sizes.values()) == 1797 and ds.num_classes == 10
    assert sizes["test"] == pytest.approx(0.15 * 1797, abs=10)
    assert sizes["validation"] == pytest.approx(0.1 * (1797 - sizes["test"]), abs=10)
    train = ds.splits["train"]
    assert (
        train.images.dtype == np.uint8
        and train.images.shape[1:] == (8, 8, 1)
        and train.images.max() == 255
    )
    for split in ds.splits.values():  # every class in every split, in proportion
        counts = np.bincount(split.labels, minlength=10)
        assert counts.min() >= 0.8 * counts.mean()
    again = load("digits")
    assert np.array_equal(again.splits["test"].labels, ds.splits["test"].labels)
    assert np.array_equal(again.splits["validation"].images, ds.splits["validation"].images)


def test_digits_read_from_the_csv_equal_scikit_learns_and_the_fallback(monkeypatch):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, labels = sources.digits_arrays()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)  # no file to read
    images, labels = sources.digits_arrays()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)


def test_loading_the_digits_does_not_import_scikit_learn():
    script = ("import sys\nfrom cnnjax.data import sources\nsources.load_digits(0.1)\n"
              "assert 'sklearn' not in sys.modules, 'sklearn was imported'\nprint('ok')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.skipif(not MNIST.exists(), reason=f"real MNIST IDX files not found at {MNIST}")
def test_idx_reader_on_real_mnist():
    train_images = idx.read_idx(MNIST / "train-images-idx3-ubyte.gz")
    train_labels = idx.read_idx(MNIST / "train-labels-idx1-ubyte.gz")
    test_labels = idx.read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")
    assert train_images.shape == (60000, 28, 28) and train_images.dtype == np.uint8
    assert len(train_labels) == 60000 and len(test_labels) == 10000
    assert np.bincount(train_labels).tolist() == MNIST_TRAIN_COUNTS
    images, labels = idx.read_idx_pair(MNIST, "t10k")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8 and len(labels) == 10000


@pytest.mark.parametrize(
    "compress,spelling", [(True, "train-images-idx3-ubyte"), (False, "train-images.idx3-ubyte")]
)
def test_idx_source_reads_gz_and_raw_and_both_spellings(tmp_path, compress, spelling):
    labels = np.arange(40) % 4
    suffix = ".gz" if compress else ""
    sep = "." if "." in spelling else "-"
    write_idx(tmp_path / f"{spelling}{suffix}", fake_images(40), compress)
    write_idx(tmp_path / f"train-labels{sep}idx1-ubyte{suffix}", labels, compress)
    write_idx(tmp_path / f"t10k-images{sep}idx3-ubyte{suffix}", fake_images(8, seed=1), compress)
    write_idx(tmp_path / f"t10k-labels{sep}idx1-ubyte{suffix}", labels[:8], compress)
    ds = load("idx", tmp_path, val_fraction=0.2)
    assert ds.num_classes == 4
    assert [len(ds.splits[s]) for s in ("train", "validation", "test")] == [32, 8, 8]
    assert np.bincount(ds.splits["validation"].labels).tolist() == [2, 2, 2, 2]
    assert np.array_equal(ds.splits["test"].images[..., 0], fake_images(8, seed=1))


def test_npz_source_with_and_without_its_own_validation(tmp_path):
    rng = np.random.default_rng(0)
    arrays = dict(
        x_train=rng.integers(0, 256, (30, 5, 5, 3), dtype=np.uint8),
        y_train=np.arange(30) % 3,
        x_test=rng.integers(0, 256, (6, 5, 5, 3), dtype=np.uint8),
        y_test=np.arange(6) % 3,
    )
    np.savez(tmp_path / "d.npz", **arrays)
    ds = load("npz", tmp_path / "d.npz", val_fraction=0.2)
    assert ds.num_classes == 3 and [len(ds.splits[s]) for s in ("train", "validation", "test")] == [
        24,
        6,
        6,
    ]
    assert ds.splits["train"].image_shape == (5, 5, 3)
    np.savez(tmp_path / "v.npz", x_val=arrays["x_test"], y_val=arrays["y_test"], **arrays)
    ds = load("npz", tmp_path / "v.npz")
    assert len(ds.splits["train"]) == 30 and len(ds.splits["validation"]) == 6


def write_pngs(root: Path, classes, per_class, size=(6, 6), mode="RGB"):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                root / name / f"{i}.png"
            )


def test_folder_source_train_test_tree(tmp_path):
    write_pngs(tmp_path / "train", ["cat", "dog"], 10)
    write_pngs(tmp_path / "test", ["cat", "dog"], 2)
    ds = load("folder", tmp_path, channels=3, val_fraction=0.2)
    assert ds.num_classes == 2
    assert [len(ds.splits[s]) for s in ("train", "validation", "test")] == [16, 4, 4]
    assert ds.splits["test"].images.shape == (4, 6, 6, 3)
    gray = load("folder", tmp_path, channels=1, val_fraction=0.2)
    assert gray.splits["train"].images.shape[-1] == 1


def test_folder_single_tree_with_mixed_sizes_is_fitted(tmp_path):
    write_pngs(tmp_path, ["a", "b"], 10, size=(6, 6))
    write_pngs(
        tmp_path, ["a"], 2, size=(9, 12), mode="L"
    )  # overwrites a/0, a/1 with bigger grayscale images
    ds = load("folder", tmp_path, image_size=5, channels=3)
    assert sum(len(s) for s in ds.splits.values()) == 20
    assert {s.image_shape for s in ds.splits.values()} == {(5, 5, 3)}


# --- bad input -----------------------------------------------------------------------------------


def test_unknown_name_lists_close_matches():
    with pytest.raises(DataError, match="unknown dataset 'digitz'.*digits"):
        load("digitz")
    with pytest.raises(DataError, match="Did you mean.*mnist"):
        load("mnistt")


@pytest.mark.parametrize("name", ["idx", "npz", "folder"])
def test_missing_path(tmp_path, name):
    with pytest.raises(DataError, match="does not exist"):
        load(name, tmp_path / "nowhere")
    with pytest.raises(DataError, match="set config.data.path"):
        load(name, "")


def test_idx_wrong_magic_and_truncated_body(tmp_path):
    write_idx(tmp_path / "bad", fake_images(3), magic=b"\x08\x03\x00\x00")
    with pytest.raises(DataError, match="wrong magic number"):
        idx.read_idx(tmp_path / "bad")
    raw = bytes([0, 0, 8, 3]) + np.asarray((3, 6, 6), ">u4").tobytes() + fake_images(3).tobytes()
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(DataError, match="truncated body"):
        idx.read_idx(tmp_path / "short.gz")


def test_idx_count_mismatch_and_missing_file(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", fake_images(5))
    with pytest.raises(DataError, match="no train-labels-idx1-ubyte"):
        load("idx", tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(4))
    with pytest.raises(DataError, match="5 images but .* 4 labels"):
        load("idx", tmp_path)


def test_npz_count_mismatch_labels_out_of_range_and_missing_keys(tmp_path):
    x = np.zeros((10, 4, 4), np.uint8)
    np.savez(
        tmp_path / "a.npz", x_train=x, y_train=np.arange(9) % 2, x_test=x, y_test=np.arange(10) % 2
    )
    with pytest.raises(DataError, match="10 images but 9 labels"):
        load("npz", tmp_path / "a.npz")
    np.savez(
        tmp_path / "b.npz", x_train=x, y_train=np.arange(10) % 2, x_test=x, y_test=np.arange(10) % 3
    )
    with pytest.raises(DataError, match="test label 2 outside the class range 0..1"):
        load("npz", tmp_path / "b.npz")
    np.savez(
        tmp_path / "c.npz", x_train=x, y_train=np.arange(10) - 1, x_test=x, y_test=np.arange(10) % 2
    )
    with pytest.raises(DataError, match="negative label"):
        load("npz", tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", x_train=x)
    with pytest.raises(DataError, match="lacks y_train, x_test, y_test"):
        load("npz", tmp_path / "d.npz")


def test_tfds_dataset_not_prepared_names_the_prepare_command(tmp_path):
    with pytest.raises(
        DataError, match=r"not prepared.*python -m cnnjax.data prepare cifar10 --data-dir"
    ):
        load("cifar10", tfds_dir=str(tmp_path))


def test_bad_sizes_and_config_values():
    mesh = jax.make_mesh((1,), ("data",))

    def build(cfg=None, **kw):
        args = dict(image_size=8, channels=1, global_batch_size=16, mesh=mesh, seed=0) | kw
        return data.build_pipeline(cfg or data.data_config(), **args)

    with pytest.raises(DataError, match="smaller than the model's minimum 32"):
        build(min_image_size=32)
    with pytest.raises(DataError, match="exceeds the .* training examples"):
        build(global_batch_size=4096)
    for field, value, message in [
        ("normalize", "zscore", "normalize="),
        ("device_resident", "yes", "device_resident="),
        ("mean", (123.0,), "divide 0-255 values by 255"),
    ]:
        cfg = data.data_config()
        cfg[field] = value
        if field == "mean":
            cfg.std = (50.0,)
        with pytest.raises(DataError, match=message):
            build(cfg)
    cfg = data.data_config()
    cfg.augment.rrc_scale = (0.5, 2.0)
    with pytest.raises(DataError, match="rrc_scale"):
        build(cfg)


def test_stratified_partition_holds_out_each_class_proportionally():
    labels = np.repeat(np.arange(3), [10, 20, 30])
    kept, held = sources.stratified_partition(labels, 0.1)
    assert np.bincount(labels[held]).tolist() == [1, 2, 3]
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(60))
