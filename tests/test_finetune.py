"""Fine-tuning helpers and config.finetune: frozen parameters stay bit-identical, LR groups scale as
configured, heads are replaced, first convolutions adapted, bad settings give one-line errors."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import config as config_lib
from cnnjax import finetune, layers
from cnnjax.models import create_model
from cnnjax.train.optim import optimizer_config

BACKBONE = ("^c[135]/",)  # LeNet-5's three convolutions


@pytest.fixture(scope="module")
def lenet():
    model = create_model("lenet5")
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 1))
    y = jnp.arange(8) % 10
    return model, variables["params"], x, y


def _loss(model, x, y):
    def loss(params):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss


def test_freeze_mask_matches_paths(lenet):
    _, params, _, _ = lenet
    mask = finetune.freeze_mask(params, BACKBONE)
    assert mask["c1"]["kernel"] and mask["c5"]["bias"]
    assert not mask["f6"]["kernel"] and not mask["output"]["bias"]


def test_frozen_params_bit_identical_and_lr_groups_scale(lenet):
    model, params, x, y = lenet
    cfg = optimizer_config()
    cfg.name, cfg.learning_rate, cfg.momentum = "sgd", 0.1, 0.0
    groups = {"backbone": {"patterns": BACKBONE, "lr_scale": 0.0},
              "head": {"patterns": ("^output/",), "lr_scale": 10.0}}
    tx, schedule = finetune.multi_lr_optimizer(cfg, groups, steps_per_epoch=10, num_epochs=1)
    assert float(schedule(0)) == pytest.approx(0.1)
    state = tx.init(params)
    loss = jax.jit(jax.value_and_grad(_loss(model, x, y)))
    grads = loss(params)[1]
    updates, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["output"]["kernel"], -1.0 * grads["output"]["kernel"],
                               rtol=1e-6)  # head: 10 x 0.1
    np.testing.assert_allclose(updates["f6"]["kernel"], -0.1 * grads["f6"]["kernel"], rtol=1e-6)
    new = params
    for _ in range(3):
        updates, state = tx.update(loss(new)[1], state, new)
        new = optax.apply_updates(new, updates)
    for name in ("c1", "c3", "c5"):
        for leaf in ("kernel", "bias"):
            assert np.array_equal(new[name][leaf], params[name][leaf])
    assert not np.array_equal(new["f6"]["kernel"], params["f6"]["kernel"])


def test_frozen_group_has_no_optimizer_state(lenet):
    _, params, _, _ = lenet
    cfg = optimizer_config()
    cfg.name = "adam"
    groups = {"backbone": {"patterns": BACKBONE, "lr_scale": 0.0}}
    tx, _ = finetune.multi_lr_optimizer(cfg, groups, steps_per_epoch=10, num_epochs=1)
    frozen = sum(p.size for n, p in params.items() if n in ("c1", "c3", "c5") for p in p.values())
    total = sum(p.size for p in jax.tree.leaves(params))
    state_size = sum(np.size(s) for s in jax.tree.leaves(tx.init(params)))
    assert state_size - 2 * (total - frozen) < 10  # adam's mu and nu for the trainable part only


def test_stop_frozen_gradients_zeroes_frozen_grads(lenet):
    model, params, x, y = lenet
    mask = finetune.freeze_mask(params, BACKBONE)
    loss = _loss(model, x, y)
    grads = jax.grad(lambda p: loss(finetune.stop_frozen_gradients(p, mask)))(params)
    assert not np.any(grads["c1"]["kernel"]) and np.any(grads["f6"]["kernel"])


def test_replace_head_keeps_backbone(lenet):
    model, params, _, _ = lenet
    new_model, variables, fresh = finetune.replace_head({"params": params}, model, 3,
                                                        input_shape=(32, 32, 1))
    assert new_model.num_classes == 3
    assert sorted(fresh) == ["params/output/bias", "params/output/kernel"]
    assert variables["params"]["output"]["kernel"].shape == (84, 3)
    assert np.array_equal(variables["params"]["c3"]["kernel"], params["c3"]["kernel"])


def test_keep_frozen_stats():
    old = {"stem_bn": {"mean": jnp.zeros(2)}, "fc_bn": {"mean": jnp.zeros(2)}}
    new = {"stem_bn": {"mean": jnp.ones(2)}, "fc_bn": {"mean": jnp.ones(2)}}
    kept = finetune.keep_frozen_stats(new, old, ("^stem_",))
    assert not np.any(kept["stem_bn"]["mean"]) and np.all(kept["fc_bn"]["mean"] == 1)


def test_adapt_first_conv_grayscale_equals_repeated_rgb():
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((5, 5, 3, 4)).astype(np.float32)
    patch = rng.standard_normal((5, 5, 1)).astype(np.float32)
    rgb = np.einsum("hwi,hwio->o", np.repeat(patch, 3, axis=2), kernel)
    gray = np.einsum("hwi,hwio->o", patch, finetune.adapt_first_conv(kernel, 1))
    np.testing.assert_allclose(gray, rgb, rtol=1e-5)
    assert finetune.adapt_first_conv(kernel, 5).shape == (5, 5, 5, 4)
    with pytest.raises(ValueError, match="in_channels"):
        finetune.adapt_first_conv(kernel, 0)


# --- config.finetune: plan, errors, heads, loading ---------------------------------------------


def _finetune(**fields):
    cfg = finetune.finetune_config()
    cfg.update(fields)
    return cfg


def test_finetune_fields_parse_from_the_command_line():
    config = config_lib.base_config()
    config_lib.set_field(config, "finetune.freeze", "('^stem', '^layer1')")
    config_lib.set_field(config, "finetune.lr_groups", "(('^fc/', 10.0),)")
    config_lib.set_field(config, "finetune.head", "(512,)")
    config_lib.set_field(config, "finetune.reinit", "^fc/")
    assert config.finetune.freeze == ("^stem", "^layer1")
    assert config.finetune.lr_groups == (("^fc/", 10.0),)
    assert config.finetune.head == (512,) and config.finetune.reinit == ("^fc/",)


def test_lr_groups_from_the_config_give_the_update_ratio(lenet):
    model, params, _, _ = lenet
    cfg = optimizer_config()
    cfg.name, cfg.learning_rate, cfg.momentum = "sgd", 0.1, 0.0
    plan = finetune.make_plan(_finetune(freeze=("^c3/",), lr_groups=(("^output/", 10.0), ("^c1/", 0.5))),
                              model, (32, 32, 1))
    tx, _ = finetune.make_optimizer(cfg, plan, steps_per_epoch=10, num_epochs=1)
    grads = jax.tree.map(jnp.ones_like, params)  # known gradients: the update is -lr * scale
    updates, _ = tx.update(grads, tx.init(params), params)
    expected = {"output": -1.0, "c1": -0.05, "c5": -0.1, "f6": -0.1, "c3": 0.0}
    for layer, value in expected.items():
        np.testing.assert_allclose(updates[layer]["kernel"], value, rtol=1e-6)
    assert plan.frozen["c3"]["kernel"] and not plan.frozen["c1"]["kernel"]
    assert plan.frozen_count(params) == params["c3"]["kernel"].size + params["c3"]["bias"].size


@pytest.mark.parametrize("accumulate_steps", [1, 3])
def test_momentum_state_only_for_trained_params(lenet, accumulate_steps):
    model, params, _, _ = lenet
    plan = finetune.make_plan(_finetune(freeze=("^c[135]/",)), model, (32, 32, 1))
    cfg = optimizer_config()
    cfg.accumulate_steps = accumulate_steps
    tx, _ = finetune.make_optimizer(cfg, plan, steps_per_epoch=10, num_epochs=1)
    state_size = sum(np.size(s) for s in jax.tree.leaves(tx.init(params)))
    trained = sum(np.size(p) for p in jax.tree.leaves(params)) - plan.frozen_count(params)
    # SGD momentum's trace (and with accumulation its gradient buffer), plus step counters.
    buffers = 1 if accumulate_steps == 1 else 2
    assert buffers * trained < state_size <= buffers * trained + 8


def test_accumulated_groups_update_like_one_step_on_the_mean_gradient():
    params = {"c1": {"kernel": jnp.ones((3, 2))}, "c3": {"kernel": jnp.ones((2, 2))},
              "output": {"kernel": jnp.ones((2, 4)), "bias": jnp.zeros(4)}}
    groups = {"freeze": {"patterns": ("^c1/",), "lr_scale": 0.0},
              "head": {"patterns": ("^output/",), "lr_scale": 10.0}}
    cfg = optimizer_config()
    cfg.grad_clip_norm = 1.0
    one, _ = finetune.multi_lr_optimizer(cfg, groups, steps_per_epoch=10, num_epochs=1)
    cfg.accumulate_steps = 2
    two, _ = finetune.multi_lr_optimizer(cfg, groups, steps_per_epoch=20, num_epochs=1)
    g1 = jax.tree.map(lambda p: jnp.full_like(p, 0.03), params)
    g2 = jax.tree.map(lambda p: jnp.full_like(p, -0.01), params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    expected, _ = one.update(mean, one.init(params), params)
    state = two.init(params)
    skipped, state = two.update(g1, state, params)
    chex.assert_trees_all_equal(skipped, jax.tree.map(jnp.zeros_like, params))  # still accumulating
    updates, _ = two.update(g2, state, params)
    chex.assert_trees_all_close(updates, expected, rtol=1e-6)
    assert not np.any(updates["c1"]["kernel"]) and np.any(updates["output"]["kernel"])


@pytest.mark.parametrize("fields, message", [
    ({"freeze": ("^stem_",)}, "finetune.freeze pattern '^stem_' matches no parameter"),
    ({"freeze": (".",)}, "freezes every parameter"),
    ({"lr_groups": (("^c1/", 0.0), ("", 0.0))}, "freezes every parameter"),
    ({"freeze": ("c1[",)}, "finetune.freeze pattern 'c1[' is not a valid regex"),
    ({"reinit": ("^fc/",)}, "finetune.reinit pattern '^fc/' matches no parameter"),
    ({"lr_groups": (("^c1/",),)}, "(regex, lr_scale >= 0) pairs"),
    ({"lr_groups": (("^c1/", -1.0),)}, "(regex, lr_scale >= 0) pairs"),
    ({"first_conv": "rgb"}, "finetune.first_conv must be"),
    ({"freeze_batch_stats": "yes"}, "finetune.freeze_batch_stats must be"),
    ({"frozen_bn": "eval"}, "finetune.frozen_bn must be"),
    ({"head": (0,)}, "finetune.head lists hidden widths"),
])
def test_bad_finetune_settings_are_one_line_errors(lenet, fields, message):
    model = lenet[0]
    with pytest.raises(ValueError) as error:
        finetune.make_plan(_finetune(**fields), model, (32, 32, 1))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_mlp_head_keeps_the_bare_models_paths():
    cfg = _finetune(head=(16, 8))
    model = finetune.build_model("lenet5", 3, cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1))))
    params = shapes["params"]
    assert params["output"]["kernel"].shape == (84, 16)  # LeNet's classifier now feeds the head
    assert params["head_hidden_0"]["kernel"].shape == (16, 8)
    assert params["head_out"]["kernel"].shape == (8, 3)
    assert params["c1"]["kernel"].shape == (5, 5, 1, 6)  # not nested under the wrapper


def _conv_source():
    rng = np.random.default_rng(0)
    source = {"params": {"stem": {"kernel": rng.standard_normal((3, 3, 3, 4)).astype(np.float32)},
                         "fc": {"kernel": rng.standard_normal((4, 5)).astype(np.float32)}}}
    target = {"params": {"stem": {"kernel": np.full((3, 3, 1, 4), 7.0, np.float32)},
                         "fc": {"kernel": np.full((4, 2), 7.0, np.float32)}}}
    return source, target


@pytest.mark.parametrize("mode", ["repeat", "mean", "new"])
def test_first_conv_modes(mode):
    source, target = _conv_source()
    merged, report = finetune.merge_variables(source, target, _finetune(first_conv=mode, strict=False))
    kernel, rgb = merged["params"]["stem"]["kernel"], source["params"]["stem"]["kernel"]
    expected = {"repeat": rgb.sum(axis=2, keepdims=True), "mean": rgb.mean(axis=2, keepdims=True),
                "new": target["params"]["stem"]["kernel"]}[mode]
    np.testing.assert_allclose(kernel, expected, rtol=1e-6)
    assert report.fresh["params/fc/kernel"] == "checkpoint (4, 5), model (4, 2)"  # new classes
    assert ("params/stem/kernel" in report.fresh) == (mode == "new")


def test_strict_mismatch_is_a_one_line_error():
    source, target = _conv_source()
    with pytest.raises(ValueError, match="finetune.strict=false") as error:
        finetune.merge_variables(source, target, _finetune(first_conv="repeat"))
    assert "params/fc/kernel: checkpoint (4, 5), model (4, 2)" in str(error.value)
    assert "\n" not in str(error.value)


def test_strict_rejects_checkpoint_arrays_the_model_lacks():
    # A deeper net's checkpoint must not half-fill a shallower one without a word.
    source, _ = _conv_source()
    source["params"]["block2"] = {"kernel": np.zeros((3, 3, 4, 4), np.float32)}
    target = {"params": {k: np.zeros_like(v["kernel"]) for k, v in source["params"].items()
                         if k != "block2"}}
    target = {"params": {k: {"kernel": v} for k, v in target["params"].items()}}
    with pytest.raises(ValueError, match="1 arrays this model lacks .first: params/block2/kernel."):
        finetune.merge_variables(source, target, _finetune())
    merged, report = finetune.merge_variables(source, target, _finetune(strict=False))
    assert report.unused == ["params/block2/kernel"] and "block2" not in merged["params"]


# --- frozen BatchNorm layers that normalise with their running statistics ------------------------


class _TwoNorms(nn.Module):
    """conv -> a_bn -> relu -> b_bn -> mean: two BN layers, so one can be frozen and one not."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(4, (3, 3), name="stem")(x)
        x = nn.relu(layers.batch_norm(train, name="a_bn")(x))
        x = layers.batch_norm(train, name="b_bn")(x)
        return nn.Dense(3, name="fc")(x.mean(axis=(1, 2)))


def _two_norms():
    model = _TwoNorms()
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 5, 5, 2)) * 3.0 + 1.0
    variables = model.init(jax.random.PRNGKey(1), x)
    # Running statistics far from the batch's, so batch and running normalisation cannot agree.
    variables["batch_stats"]["a_bn"] = {"mean": jnp.full(4, 0.5), "var": jnp.full(4, 4.0)}
    return model, variables, x


def test_running_bn_plan_names_the_kept_layers():
    model = _TwoNorms()
    plan = finetune.make_plan(_finetune(freeze=("^stem/", "^a_bn/"), frozen_bn="running"), model,
                              (5, 5, 2))
    assert plan.running_bn == frozenset({"a_bn"})
    assert finetune.make_plan(_finetune(freeze=("^stem/", "^a_bn/")), model, (5, 5, 2)).running_bn \
        == frozenset()  # the default normalises with batch statistics, as before
    everything = finetune.make_plan(_finetune(freeze_batch_stats="all", frozen_bn="running"), model,
                                    (5, 5, 2))
    assert everything.running_bn == frozenset({"a_bn", "b_bn"})


def test_running_bn_uses_running_stats_in_train_mode_for_those_layers_only():
    model, variables, x = _two_norms()
    stats = variables["batch_stats"]

    def features(train, running=frozenset()):
        with finetune.running_stats_bn(running):
            out, new = model.apply(variables, x, train=train, mutable=["batch_stats", "intermediates"],
                                   capture_intermediates=lambda mdl, _: mdl.name == "a_bn")
        return out, new["intermediates"]["a_bn"]["__call__"][0], new["batch_stats"]

    _, a_eval, _ = features(False)
    _, a_batch, _ = features(True)
    _, a_running, new_stats = features(True, frozenset({"a_bn"}))
    np.testing.assert_allclose(a_running, a_eval, rtol=1e-6, atol=1e-6)
    assert not np.allclose(a_batch, a_eval, atol=1e-2)  # without it, train mode differs
    chex.assert_trees_all_equal(new_stats["a_bn"], stats["a_bn"])  # no running-average update
    assert not np.allclose(new_stats["b_bn"]["mean"], stats["b_bn"]["mean"])  # b_bn still trains
    # b_bn still normalises with its batch: its output has zero mean per channel.
    with finetune.running_stats_bn(frozenset({"a_bn"})):
        _, new = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                             capture_intermediates=lambda mdl, _: mdl.name == "b_bn")
    b = new["intermediates"]["b_bn"]["__call__"][0]
    np.testing.assert_allclose(b.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)


def test_train_step_with_running_bn_matches_eval_mode():
    from cnnjax import distributed
    from cnnjax.train import losses
    from cnnjax.train import state as train_state
    from cnnjax.train import step as train_step_lib

    model, variables, x = _two_norms()
    mesh = distributed.make_mesh()
    tx = optax.sgd(0.0)
    state = train_state.create_train_state(model, tx, seed=1, input_shape=(5, 5, 2), mesh=mesh)
    state = state.replace(batch_stats=variables["batch_stats"], params=variables["params"])
    batch = {"image": x, "label": jnp.arange(6) % 3, "mask": jnp.ones(6, bool)}
    kwargs = dict(model=model, tx=tx, schedule=optax.constant_schedule(0.0),
                  loss_cfg=losses.loss_config(), num_classes=3)
    _, per_example, _, _ = train_step_lib.eval_step(state, batch, model=model,
                                                    loss_cfg=kwargs["loss_cfg"], num_classes=3)
    everything = frozenset({"a_bn", "b_bn"})
    step = jax.jit(functools.partial(train_step_lib.train_step, **kwargs),
                   static_argnames="running_bn")
    _, running = step(state, batch, running_bn=everything)
    _, batch_mode = step(state, batch)
    np.testing.assert_allclose(running["loss"], per_example.mean(), rtol=1e-5)
    assert abs(float(batch_mode["loss"]) - float(per_example.mean())) > 1e-3
