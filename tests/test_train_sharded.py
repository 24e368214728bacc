"""One train step on 8 simulated CPU devices equals the same step on 1 device (fp32, 1e-5).

Runs in a subprocess because the device count is fixed when JAX starts.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import AxisType, Mesh
    import tests.test_train_step as t
    from cnnjax import distributed
    from cnnjax.train import losses, optim
    from cnnjax.train.state import create_train_state
    from cnnjax.train.step import compile_steps

    assert jax.device_count() == 8, jax.devices()
    model = t.TinyNet()
    cfg = optim.optimizer_config()
    cfg.name, cfg.learning_rate = "sgd", 0.1
    tx, schedule = optim.make_optimizer(cfg, steps_per_epoch=10, num_epochs=1)
    results = []
    for n in (8, 1):
        mesh = Mesh(np.array(jax.devices()[:n]), ("data",), axis_types=(AxisType.Auto,))
        train, _ = compile_steps(mesh, model=model, tx=tx, schedule=schedule,
                                 loss_cfg=losses.loss_config(), num_classes=4)
        state = create_train_state(model, tx, seed=0, input_shape=(8, 8, 1), mesh=mesh)
        batch = t._batch(mesh, n=32)
        assert len(batch["image"].sharding.device_set) == n
        state, metrics = train(state, batch)
        results.append(jax.device_get((state.params, state.batch_stats, metrics)))
    flat8, flat1 = (jax.tree.leaves(r) for r in results)
    for a, b in zip(flat8, flat1, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    print("SHARDED_OK", len(flat8))
""")


def test_eight_device_step_equals_one_device_step():
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join([*kept, "--xla_force_host_platform_device_count=8"]),
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SHARDED_OK" in out.stdout
