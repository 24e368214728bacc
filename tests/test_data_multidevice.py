"""Eight simulated devices: batches sharded on 'data', host == device path, eval covers each example once.

Runs in a subprocess because XLA_FLAGS must be set before JAX starts, and other tests start it first.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from cnnjax import data

    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))

    def build(resident):
        cfg = data.data_config()
        cfg.device_resident = resident
        cfg.augment.update(dict(random_crop_padding=1, hflip=True, cutout=2, mixup_alpha=0.2))
        return data.build_pipeline(cfg, image_size=8, channels=1, global_batch_size=24, mesh=mesh, seed=1)

    device, host = build("always"), build("never")
    for a, b in zip(device.train_batches(2), host.train_batches(2)):
        for key in ("image", "label", "target"):
            assert a[key].sharding.spec == P("data") and len(a[key].sharding.device_set) == 8, key
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
        break
    try:
        data.build_pipeline(data.data_config(), image_size=8, channels=1, global_batch_size=12, mesh=mesh, seed=0)
        raise AssertionError("a batch of 12 on 8 devices must be refused")
    except data.DataError as err:
        assert "multiple of 8" in str(err)
    for pipeline in (device, host):
        n = pipeline.num_examples("test")
        seen = [(np.asarray(b["label"]), np.asarray(b["mask"])) for b in pipeline.eval_batches("test")]
        labels = np.concatenate([l for l, _ in seen]); mask = np.concatenate([m for _, m in seen])
        assert len(labels) % 24 == 0 and mask.sum() == n and not mask[n:].any()
        np.testing.assert_array_equal(labels[:n], pipeline._splits["test"].labels)
    print("ok")
""")


def test_eight_devices_shard_batches_and_paths_agree():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
