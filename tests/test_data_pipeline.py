"""The Pipeline: host and device paths agree, resume is exact, eval covers every example once, no TensorFlow."""

import importlib.abc
import sys
import traceback

import jax
import numpy as np
import pytest

from cnnjax import data

ALL_AUGMENTATIONS = dict(
    random_crop_padding=1,
    random_resized_crop=True,
    hflip=True,
    vflip=True,
    rotation=15.0,
    translate=0.1,
    grayscale=0.0,
    cutout=2,
    mixup_alpha=0.2,
    cutmix_alpha=1.0,
)
BATCH = 16


def digits_pipeline(
    resident="always", image_size=8, channels=1, augment=ALL_AUGMENTATIONS, **fields
):
    cfg = data.data_config()
    cfg.device_resident = resident
    cfg.augment.update(augment)
    cfg.update(fields)
    mesh = jax.make_mesh((1,), ("data",))
    return data.build_pipeline(
        cfg, image_size=image_size, channels=channels, global_batch_size=BATCH, mesh=mesh, seed=3
    )


def take(iterator, n):
    return [jax.tree.map(np.asarray, next(iterator)) for _ in range(n)]


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def device():
    return digits_pipeline("always")


@pytest.fixture(scope="module")
def host():
    return digits_pipeline("never")


@pytest.fixture(scope="module")
def device_run(device):
    return take(device.train_batches(0), 7)


def test_contract_fields_and_batch_layout(device, device_run):
    assert device.resident and device.name == "digits" and device.num_classes == 10
    assert device.steps_per_epoch == device.num_train // BATCH and device.image_shape == (8, 8, 1)
    batch = device_run[0]
    assert batch["image"].shape == (BATCH, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["target"].shape == (BATCH, 10)
    np.testing.assert_allclose(batch["target"].sum(-1), 1.0, atol=1e-6)
    live = next(device.train_batches(0))
    assert live["image"].sharding.spec == jax.sharding.PartitionSpec("data")


def test_host_and_device_paths_give_identical_batches(host, device_run):
    assert not host.resident
    for a, b in zip(take(host.train_batches(0), 3), device_run[:3], strict=True):
        assert_batches_equal(a, b)


def test_resume_from_a_step_reproduces_the_uninterrupted_run(device, host, device_run):
    for a, b in zip(take(device.train_batches(5), 2), device_run[5:7], strict=True):
        assert_batches_equal(a, b)
    assert_batches_equal(take(host.train_batches(6), 1)[0], device_run[6])


def test_each_epoch_is_a_fresh_permutation_of_the_training_set(device):
    spe = device.steps_per_epoch
    first = np.concatenate([device.train_indices(s) for s in range(spe)])
    second = np.concatenate([device.train_indices(s) for s in range(spe, 2 * spe)])
    assert len(set(first.tolist())) == len(first) == spe * BATCH
    assert not np.array_equal(first, second)
    train_labels = device._splits["train"].labels
    np.testing.assert_array_equal(
        next(device.train_batches(spe + 2))["label"], train_labels[device.train_indices(spe + 2)]
    )


@pytest.mark.parametrize("split", ["validation", "test"])
def test_eval_covers_every_example_once_with_padding_masked(device, host, split):
    n = device.num_examples(split)
    batches = take(device.eval_batches(split), -(-n // BATCH))
    assert next(device.eval_batches(split), None) is not None
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert mask.sum() == n and mask[:n].all() and not mask[n:].any()
    np.testing.assert_array_equal(labels[:n], device._splits[split].labels)
    assert "target" not in batches[0]
    for a, b in zip(host.eval_batches(split), batches, strict=True):
        assert_batches_equal(jax.tree.map(np.asarray, a), b)


def test_standardize_uses_train_statistics_and_minmax_stays_in_unit_range(device):
    train = device._splits["train"].images / 255.0
    assert device.mean[0] == pytest.approx(train.mean(), abs=1e-5)
    assert device.std[0] == pytest.approx(train.std(), abs=1e-5)
    minmax = digits_pipeline(image_size=12, channels=3, augment={}, normalize="minmax")
    batch = next(minmax.eval_batches("test"))
    assert batch["image"].shape == (BATCH, 12, 12, 3)
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0


def test_grain_worker_processes_deliver_the_same_batches(device_run):
    workers = digits_pipeline("never", workers=1)
    assert_batches_equal(take(workers.train_batches(1), 1)[0], device_run[1])


class _RecordTensorFlowImports(importlib.abc.MetaPathFinder):
    """Records `import tensorflow` attempts (TF need not be installed); mere `find_spec` probes don't count."""

    def __init__(self):
        self.attempts = []

    def find_spec(self, name, path=None, target=None):
        importing = any(frame.name == "_find_and_load" for frame in traceback.extract_stack())
        if importing and (name == "tensorflow" or name.startswith("tensorflow.")):
            self.attempts.append(name)
        return None


def test_tfds_names_load_through_data_source_without_tensorflow():
    tfds = pytest.importorskip("tensorflow_datasets")
    recorder = _RecordTensorFlowImports()
    sys.meta_path.insert(0, recorder)
    try:
        with tfds.testing.mock_data(num_examples=24):
            cfg = data.data_config()
            cfg.name, cfg.augment.hflip = "mnist", True
            mesh = jax.make_mesh((1,), ("data",))
            pipeline = data.build_pipeline(
                cfg, image_size=8, channels=1, global_batch_size=8, mesh=mesh, seed=0
            )
            batch = next(pipeline.train_batches(0))
            cfg.name, cfg.device_resident = (
                "imagenet2012",
                "auto",
            )  # variable-size JPEGs: the host path
            imagenet = data.build_pipeline(
                cfg, image_size=8, channels=3, global_batch_size=8, mesh=mesh, seed=0
            )
            assert not imagenet.resident and imagenet.num_classes == 1000
            assert next(imagenet.eval_batches("test"))["image"].shape == (8, 8, 8, 3)
            cfg.device_resident = "always"
            with pytest.raises(data.DataError, match="varying size"):
                data.build_pipeline(
                    cfg, image_size=8, channels=3, global_batch_size=8, mesh=mesh, seed=0
                )
    finally:
        sys.meta_path.remove(recorder)
    assert pipeline.num_classes == 10 and pipeline.resident and batch["image"].shape == (8, 8, 8, 1)
    assert pipeline.num_examples("test") == 24
    assert "tensorflow" not in sys.modules and not recorder.attempts
