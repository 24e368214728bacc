"""Classification losses chosen by config: softmax cross-entropy, multiclass hinge and MSE, all in fp32."""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

LOSSES = ("cross_entropy", "hinge", "mse")


def loss_config() -> ml_collections.ConfigDict:
    """Defaults for `config.loss`.

    name: "cross_entropy" | "hinge" | "mse".
    label_smoothing: alpha of optax.smooth_labels, applied to the (possibly mixed) targets of
      cross_entropy and mse; the hinge loss compares scores, not probabilities, so it rejects it.
    """
    cfg = ml_collections.ConfigDict()
    cfg.name = "cross_entropy"
    cfg.label_smoothing = 0.0
    return cfg


def _check(cfg: Any, logits: jax.Array, labels: jax.Array, num_classes: int, targets) -> None:
    if cfg.name not in LOSSES:
        raise ValueError(f"unknown loss.name {cfg.name!r}; choose one of {', '.join(LOSSES)}")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ValueError(
            f"loss.label_smoothing={cfg.label_smoothing} is outside [0, 1); use e.g. 0.1"
        )
    if cfg.name == "hinge" and cfg.label_smoothing:
        raise ValueError("loss.label_smoothing is not defined for the hinge loss; set it to 0.0")
    if logits.ndim != 2 or logits.shape[-1] != num_classes:
        raise ValueError(
            f"logits have shape {logits.shape}, expected [batch, {num_classes}]; "
            "check the model's num_classes"
        )
    if targets is not None and targets.shape != logits.shape:
        raise ValueError(
            f"targets have shape {targets.shape}, expected the logits shape {logits.shape}"
        )
    if targets is None and labels.shape != logits.shape[:1]:
        raise ValueError(
            f"labels have shape {labels.shape}, expected [{logits.shape[0]}] integer classes"
        )


def _hinge_hard(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """Weston-Watkins multiclass SVM: sum over j != y of max(0, s_j - s_y + 1)."""
    correct = jnp.take_along_axis(scores, labels[:, None], axis=-1)
    margins = jnp.maximum(0.0, scores - correct + 1.0)
    # The j == y term is max(0, 1) = 1 for every example; remove it instead of masking.
    return jnp.sum(margins, axis=-1) - 1.0


def _hinge_per_class(scores: jax.Array) -> jax.Array:
    """[B, C]: the hinge loss each example would have if its label were class k, for every k.

    Direct evaluation needs a [B, C, C] tensor (4 GB at B=1024, C=1000); sorting the scores once
    gives each sum_j max(0, s_j - (s_k - 1)) from a prefix sum in O(C log C).
    """
    num_classes = scores.shape[-1]

    def one_example(s):
        ascending = jnp.sort(s)
        prefix = jnp.concatenate([jnp.zeros((1,), s.dtype), jnp.cumsum(ascending)])
        threshold = s - 1.0
        below = jnp.searchsorted(ascending, threshold, side="right")  # how many s_j <= threshold
        above_sum = prefix[-1] - prefix[below]
        return above_sum - (num_classes - below) * threshold - 1.0

    return jax.vmap(one_example)(scores)


def per_example_loss(
    cfg: Any,
    logits: jax.Array,
    labels: jax.Array,
    num_classes: int,
    targets: jax.Array | None = None,
) -> jax.Array:
    """Unreduced fp32 loss [B]. `targets` (soft labels [B, C], e.g. from mixup) replace `labels` when given.

    cross_entropy: softmax cross-entropy against the (smoothed) targets.
    hinge: Weston-Watkins / CS231n multiclass SVM, sum_{j != y} max(0, s_j - s_y + 1); with soft
      targets t it is the expectation sum_k t_k * hinge(y=k), so a mixup pair mixes the two losses.
    mse: mean over classes of (logit - target)^2 on the raw logits, targets one-hot (or soft, smoothed).
    """
    _check(cfg, logits, labels, num_classes, targets)
    logits = logits.astype(jnp.float32)
    if targets is None:
        if cfg.name == "hinge":
            return _hinge_hard(logits, labels.astype(jnp.int32))
        targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    targets = targets.astype(jnp.float32)
    if cfg.name == "hinge":
        return jnp.sum(targets * _hinge_per_class(logits), axis=-1)
    if cfg.label_smoothing:
        targets = optax.smooth_labels(targets, cfg.label_smoothing)
    if cfg.name == "cross_entropy":
        return optax.softmax_cross_entropy(logits, targets)
    return jnp.mean(jnp.square(logits - targets), axis=-1)


def compute_loss(
    cfg: Any,
    logits: jax.Array,
    labels: jax.Array,
    num_classes: int,
    targets: jax.Array | None = None,
) -> jax.Array:
    """Mean over the batch of `per_example_loss`, an fp32 scalar."""
    return jnp.mean(per_example_loss(cfg, logits, labels, num_classes, targets))
