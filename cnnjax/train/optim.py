"""Build the optax optimiser and learning-rate schedule from `config.optimizer`."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ("sgd", "sgd_nesterov", "adagrad", "rmsprop", "adam", "adamw", "lars", "lamb")
SCHEDULES = ("constant", "step", "multistep", "cosine", "onecycle", "exponential")
# These add weight_decay * w to the gradient (L2 regularisation) before the update rule; the
# others (AdamW, LAMB, LARS) apply their own decoupled or trust-ratio-scaled decay.
_COUPLED_DECAY = ("sgd", "sgd_nesterov", "adagrad", "rmsprop", "adam")


def optimizer_config() -> ml_collections.ConfigDict:
    """Defaults for `config.optimizer`. Epoch counts may be fractional.

    Schedules (warmup_epochs of linear warmup from 0 to learning_rate precede all but onecycle):
      constant     learning_rate.
      step         times decay_rate every decay_epochs[0] epochs (staircase, counted from step 0).
      multistep    times decay_rate at each epoch in decay_epochs (counted from step 0).
      cosine       cosine from learning_rate after warmup to end_learning_rate at the last step.
      onecycle     optax.cosine_onecycle_schedule over the whole run, peak learning_rate; its own
                   warmup is onecycle_pct_start of the run, so warmup_epochs must stay 0.
      exponential  smooth decay by decay_rate per decay_epochs[0] epochs (1 if empty) after warmup,
                   never below end_learning_rate.
    """
    cfg = ml_collections.ConfigDict()
    cfg.name = "sgd"
    cfg.learning_rate = 0.1
    cfg.momentum = 0.9  # sgd, rmsprop (0 = off), lars
    cfg.nesterov = False  # sgd, rmsprop, lars; "sgd_nesterov" forces it on
    cfg.b1 = 0.9
    cfg.b2 = 0.999
    cfg.eps = 1e-8  # adam, adamw, lamb, rmsprop, adagrad
    cfg.rms_decay = 0.9  # rmsprop's squared-gradient average
    cfg.initial_accumulator_value = 0.1  # adagrad
    cfg.trust_coefficient = 0.001  # lars
    cfg.weight_decay = 0.0  # never applied to biases or batch-norm parameters (see decay_mask)
    cfg.schedule = "constant"
    cfg.warmup_epochs = 0.0
    cfg.decay_epochs = ()
    cfg.decay_rate = 0.1
    cfg.end_learning_rate = 0.0
    cfg.onecycle_pct_start = 0.3
    cfg.onecycle_div_factor = 25.0
    cfg.onecycle_final_div_factor = 1e4
    cfg.grad_clip_norm = 0.0  # 0 = off
    cfg.accumulate_steps = 1  # > 1: average gradients of this many batches per update
    cfg.ema_decay = 0.0  # 0 = off; the trainer keeps an EMA of the params for eval
    return cfg


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: kernels (ndim > 1), not biases or batch-norm scale/bias."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def ema_update(ema_params: Any, params: Any, decay: float | jax.Array) -> Any:
    """One step of the exponential moving average: decay * ema + (1 - decay) * params."""
    return jax.tree.map(
        lambda e, p: e + (1.0 - decay) * (p.astype(e.dtype) - e), ema_params, params
    )


def _check_schedule(cfg: Any, steps_per_epoch: float, num_epochs: float) -> None:
    if cfg.schedule not in SCHEDULES:
        raise ValueError(
            f"unknown optimizer.schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}"
        )
    if steps_per_epoch <= 0 or num_epochs <= 0:
        raise ValueError(
            f"steps_per_epoch={steps_per_epoch} and num_epochs={num_epochs} must be positive; "
            "use a batch_size no larger than the training set"
        )
    if cfg.learning_rate < 0:
        raise ValueError(
            f"optimizer.learning_rate={cfg.learning_rate} is negative; use a positive value"
        )
    if not 0 <= cfg.warmup_epochs <= num_epochs:
        raise ValueError(
            f"optimizer.warmup_epochs={cfg.warmup_epochs} must lie in [0, num_epochs={num_epochs}]"
        )
    if cfg.schedule in ("step", "multistep") and not cfg.decay_epochs:
        raise ValueError(
            f"schedule {cfg.schedule!r} needs optimizer.decay_epochs, e.g. (30, 60, 90)"
        )
    if cfg.schedule in ("step", "exponential") and cfg.decay_epochs and cfg.decay_epochs[0] <= 0:
        raise ValueError(f"optimizer.decay_epochs[0]={cfg.decay_epochs[0]} must be positive")
    if cfg.schedule == "multistep" and list(cfg.decay_epochs) != sorted(set(cfg.decay_epochs)):
        raise ValueError(
            f"optimizer.decay_epochs={tuple(cfg.decay_epochs)} must be strictly increasing"
        )
    if cfg.schedule == "onecycle" and cfg.warmup_epochs:
        raise ValueError(
            "schedule 'onecycle' warms up by itself; set optimizer.warmup_epochs=0 (see onecycle_pct_start)"
        )


def _decay_schedule(cfg: Any, steps_per_epoch: float, total: int, warmup: int) -> optax.Schedule:
    """The schedule after warmup, as a function of the absolute update count."""
    lr = cfg.learning_rate
    every = (cfg.decay_epochs[0] if cfg.decay_epochs else 1.0) * steps_per_epoch
    if cfg.schedule == "constant":
        return lambda step: lr
    if cfg.schedule == "step":
        return lambda step: lr * cfg.decay_rate ** jnp.floor(step / every)
    if cfg.schedule == "multistep":
        boundaries = {round(e * steps_per_epoch): cfg.decay_rate for e in cfg.decay_epochs}
        return optax.piecewise_constant_schedule(lr, boundaries)
    if cfg.schedule == "cosine":
        alpha = cfg.end_learning_rate / lr if lr > 0 else 0.0
        cosine = optax.cosine_decay_schedule(lr, decay_steps=max(total - warmup, 1), alpha=alpha)
        return lambda step: cosine(jnp.maximum(step - warmup, 0))
    if cfg.schedule == "exponential":
        exponential = optax.exponential_decay(
            lr,
            transition_steps=every,
            decay_rate=cfg.decay_rate,
            end_value=cfg.end_learning_rate or None,
        )
        return lambda step: exponential(jnp.maximum(step - warmup, 0))
    return optax.cosine_onecycle_schedule(
        transition_steps=total,
        peak_value=lr,
        pct_start=cfg.onecycle_pct_start,
        div_factor=cfg.onecycle_div_factor,
        final_div_factor=cfg.onecycle_final_div_factor,
    )


def make_schedule(cfg: Any, *, steps_per_epoch: float, num_epochs: float) -> optax.Schedule:
    """Learning rate as a function of the update count (fp32). See optimizer_config for the shapes."""
    _check_schedule(cfg, steps_per_epoch, num_epochs)
    total = max(round(steps_per_epoch * num_epochs), 1)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    after_warmup = _decay_schedule(cfg, steps_per_epoch, total, warmup)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        lr = jnp.asarray(after_warmup(step), jnp.float32)
        if warmup > 0:
            lr = jnp.where(step < warmup, cfg.learning_rate * step / warmup, lr)
        return lr

    return schedule


def _update_rule(cfg: Any, lr: optax.Schedule) -> optax.GradientTransformation:
    """The named optimiser; decoupled weight decay is configured here, coupled decay by the caller."""
    momentum = cfg.momentum or None
    nesterov = cfg.nesterov or cfg.name == "sgd_nesterov"
    if nesterov and not momentum and cfg.name in ("sgd", "sgd_nesterov", "rmsprop"):
        raise ValueError(f"Nesterov momentum needs optimizer.momentum > 0 (got {cfg.momentum})")
    wd = cfg.weight_decay
    if cfg.name in ("sgd", "sgd_nesterov"):
        return optax.sgd(lr, momentum=momentum, nesterov=nesterov)
    if cfg.name == "adagrad":
        return optax.adagrad(
            lr, initial_accumulator_value=cfg.initial_accumulator_value, eps=cfg.eps
        )
    if cfg.name == "rmsprop":
        return optax.rmsprop(
            lr, decay=cfg.rms_decay, eps=cfg.eps, momentum=momentum, nesterov=nesterov
        )
    if cfg.name == "adam":
        return optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if cfg.name == "adamw":
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=decay_mask)
    if cfg.name == "lamb":
        return optax.lamb(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=decay_mask)
    # LARS: biases and batch-norm parameters skip both the decay and the layer-wise trust ratio.
    return optax.lars(
        lr,
        weight_decay=wd,
        weight_decay_mask=decay_mask,
        trust_coefficient=cfg.trust_coefficient,
        trust_ratio_mask=decay_mask,
        momentum=cfg.momentum,
        nesterov=nesterov,
    )


def check_optimizer(cfg: Any) -> None:
    """One-line errors for optimizer settings that no update rule accepts."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer.name {cfg.name!r}; choose one of {', '.join(OPTIMIZERS)}"
        )
    if cfg.weight_decay < 0 or cfg.grad_clip_norm < 0:
        raise ValueError(
            "optimizer.weight_decay and optimizer.grad_clip_norm must be >= 0 (0 turns them off)"
        )
    if not isinstance(cfg.accumulate_steps, int) or cfg.accumulate_steps < 1:
        raise ValueError(
            f"optimizer.accumulate_steps={cfg.accumulate_steps!r} must be an integer >= 1"
        )
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(
            f"optimizer.ema_decay={cfg.ema_decay} must lie in [0, 1); e.g. 0.9999, or 0 for off"
        )


def make_optimizer(
    cfg: Any, *, steps_per_epoch: int, num_epochs: float
) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
    """(optimizer, schedule). The schedule is the one the optimizer uses: a function of the update
    count, which is train_step // accumulate_steps.

    Order of the chain: clip by global norm, coupled weight decay (sgd/adagrad/rmsprop/adam), update
    rule; with accumulate_steps = k > 1 the chain is wrapped in optax.MultiSteps, so it sees the mean
    of k batch gradients and its schedule advances once per k train steps (an epoch is
    steps_per_epoch / k updates).
    """
    check_optimizer(cfg)
    k = cfg.accumulate_steps
    per_update = make_schedule(cfg, steps_per_epoch=steps_per_epoch / k, num_epochs=num_epochs)
    chain = []
    if cfg.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    if cfg.weight_decay > 0 and cfg.name in _COUPLED_DECAY:
        chain.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
    chain.append(_update_rule(cfg, per_update))
    optimizer = optax.chain(*chain)
    if k > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=k).gradient_transformation()
    return optimizer, per_update
