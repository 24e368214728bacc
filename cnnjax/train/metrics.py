"""Classification metrics over a whole evaluation split, in numpy on the host (sklearn-compatible)."""

import numpy as np

TOP_K = 5


def _check(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    if probs.ndim != 2 or probs.shape[1] != num_classes:
        raise ValueError(
            f"probs have shape {probs.shape}, expected [N, {num_classes}]; pass softmax outputs"
        )
    if labels.shape != (probs.shape[0],):
        raise ValueError(
            f"labels have shape {labels.shape}, expected [{probs.shape[0]}] to match probs"
        )
    if probs.shape[0] == 0:
        raise ValueError("no examples to evaluate; check that the split is not empty")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}); got {labels.min()}..{labels.max()}"
        )
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contain NaN or inf; the model diverged (check the learning rate)")


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] counts, rows = true class, columns = predicted class (sklearn's layout)."""
    flat = labels.astype(np.int64) * num_classes + predictions
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of examples whose label is among the k highest scores.

    Ties are broken toward the lower class index, like np.argmax, so the top-1 prediction is always
    in the top k. (sklearn's top_k_accuracy_score breaks them toward the higher index.)
    """
    true_score = probs[np.arange(len(labels)), labels][:, None]
    lower_index = np.arange(probs.shape[1])[None, :] < labels[:, None]
    rank = np.sum(probs > true_score, axis=1) + np.sum((probs == true_score) & lower_index, axis=1)
    return float(np.mean(rank < k))


def _rank_sum(sorted_scores: np.ndarray, scores: np.ndarray) -> float:
    """Sum of the 1-based ranks of `scores` within `sorted_scores`, tied values sharing the mean of
    their ranks."""
    below = np.searchsorted(sorted_scores, scores, side="left")
    up_to = np.searchsorted(sorted_scores, scores, side="right")
    return float(np.sum((below + up_to + 1) / 2.0))


def binary_roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties counting 1/2.

    This is the Mann-Whitney U statistic, equal to sklearn's trapezoidal roc_auc_score.
    """
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    rank_sum = _rank_sum(np.sort(scores), scores[positive])
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def roc_auc_per_class(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> list:
    """One-vs-rest AUC of each class; None where undefined.

    A class absent from `labels` has no positive example, so its AUC is undefined (sklearn raises);
    likewise every class is undefined when all labels are the same class (no negatives).
    Cost: one sort of the N scores per class (seconds for ImageNet's 50k x 1000 on one core).
    """
    counts = np.bincount(labels, minlength=num_classes)
    aucs = []
    for c in range(num_classes):
        defined = 0 < counts[c] < len(labels)
        aucs.append(binary_roc_auc(probs[:, c], labels == c) if defined else None)
    return aucs


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (sklearn's zero_division=0)."""
    return np.where(denominator > 0, numerator / np.maximum(denominator, 1), 0.0)


def classification_metrics(
    probs: np.ndarray, labels: np.ndarray, num_classes: int, loss: float | None = None
) -> dict:
    """All evaluation metrics of one split from its predicted probabilities [N, C] and labels [N].

    accuracy: top-1 with the np.argmax prediction; top5_error: 1 - top-5 accuracy (top-min(5, C)).
    precision, recall, f1: macro averages over the classes that occur in the labels or the
    predictions (sklearn's default label set), 0 for a class with no predictions or no examples
    (zero_division=0); the *_per_class lists cover all num_classes.
    roc_auc: one-vs-rest, macro average over the classes present in the labels (a class absent from
    the labels has no AUC, see roc_auc_per_class); None if fewer than two classes are present.
    confusion_matrix: rows true, columns predicted. loss: passed through (None if not given).
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels).astype(np.int64)
    _check(probs, labels, num_classes)
    predictions = np.argmax(probs, axis=1)
    matrix = confusion_matrix(labels, predictions, num_classes)
    hits = np.diag(matrix).astype(np.float64)
    predicted, actual = matrix.sum(0), matrix.sum(1)
    precision = _safe_divide(hits, predicted)
    recall = _safe_divide(hits, actual)
    f1 = _safe_divide(2.0 * hits, predicted + actual)  # = 2PR / (P + R)
    seen = (predicted + actual) > 0
    aucs = roc_auc_per_class(probs, labels, num_classes)
    defined = [a for a in aucs if a is not None]
    return {
        "loss": None if loss is None else float(loss),
        "accuracy": float(hits.sum() / len(labels)),
        "top5_error": 1.0 - top_k_accuracy(probs, labels, min(TOP_K, num_classes)),
        "precision": float(precision[seen].mean()),
        "recall": float(recall[seen].mean()),
        "f1": float(f1[seen].mean()),
        "precision_per_class": precision.tolist(),
        "recall_per_class": recall.tolist(),
        "f1_per_class": f1.tolist(),
        "roc_auc": float(np.mean(defined)) if defined else None,
        "roc_auc_per_class": aucs,
        "confusion_matrix": matrix.tolist(),
        "num_examples": len(labels),
    }
