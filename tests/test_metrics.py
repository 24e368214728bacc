"""classification_metrics against scikit-learn on random predictions with ties and absent classes."""

import numpy as np
import pytest
from sklearn import metrics as skm

from cnnjax.train.metrics import classification_metrics


def _predictions(seed, n, num_classes, label_classes):
    rng = np.random.default_rng(seed)
    # Logits on a coarse grid give many tied probabilities, within rows and across examples.
    logits = np.round(rng.normal(size=(n, num_classes)) * 2) / 2
    logits[:5] = 0.0  # fully tied rows: every class scores the same
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.choice(label_classes, size=n)
    return probs.astype(np.float32), labels


def _check_against_sklearn(probs, labels, num_classes):
    got = classification_metrics(probs, labels, num_classes, loss=0.25)
    predictions = probs.argmax(1)
    classes = np.arange(num_classes)
    assert got["loss"] == 0.25
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(labels, predictions))
    # sklearn breaks top-k ties toward the higher class index, ours toward the lower (like argmax):
    # reversing the class order makes the two conventions coincide.
    top5 = skm.top_k_accuracy_score(num_classes - 1 - labels, probs[:, ::-1], k=5, labels=classes)
    assert got["top5_error"] == pytest.approx(1 - top5)
    macro = skm.precision_recall_fscore_support(
        labels, predictions, average="macro", zero_division=0
    )
    assert [got["precision"], got["recall"], got["f1"]] == pytest.approx(list(macro[:3]))
    per_class = skm.precision_recall_fscore_support(
        labels, predictions, labels=classes, average=None, zero_division=0
    )
    for key, expected in zip(("precision", "recall", "f1"), per_class[:3], strict=False):
        np.testing.assert_allclose(got[f"{key}_per_class"], expected, rtol=1e-12, err_msg=key)
    np.testing.assert_array_equal(
        got["confusion_matrix"], skm.confusion_matrix(labels, predictions, labels=classes)
    )
    return got


def test_matches_sklearn_with_a_class_absent_from_labels():
    num_classes = 7
    probs, labels = _predictions(0, 300, num_classes, label_classes=[0, 1, 2, 4, 5, 6])
    got = _check_against_sklearn(probs, labels, num_classes)
    # The absent class 3 has no AUC; the macro average runs over the six present classes.
    present = [c for c in range(num_classes) if c != 3]
    per_class = [skm.roc_auc_score(labels == c, probs[:, c]) for c in present]
    assert got["roc_auc_per_class"][3] is None
    np.testing.assert_allclose(
        [got["roc_auc_per_class"][c] for c in present], per_class, rtol=1e-12
    )
    assert got["roc_auc"] == pytest.approx(np.mean(per_class), rel=1e-12)


def test_matches_sklearn_multiclass_roc_auc_when_all_classes_present():
    probs, labels = _predictions(1, 400, 10, label_classes=np.arange(10))
    got = _check_against_sklearn(probs, labels, 10)
    expected = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert got["roc_auc"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.filterwarnings("ignore:.*greater than or equal to:UserWarning")
def test_fewer_than_five_classes_and_a_single_label_class():
    probs, labels = _predictions(2, 50, 3, label_classes=[1])
    got = _check_against_sklearn(probs, labels, 3)
    assert got["top5_error"] == 0.0  # top-min(5, C): every label is in the top 3 of 3
    assert got["roc_auc"] is None and got["roc_auc_per_class"] == [None, None, None]
    assert got["loss"] == 0.25


def test_bad_inputs_raise():
    probs = np.full((4, 3), 1 / 3, np.float32)
    with pytest.raises(ValueError, match=r"expected \[N, 5\]"):
        classification_metrics(probs, np.zeros(4, int), 5)
    with pytest.raises(ValueError, match="labels must lie in"):
        classification_metrics(probs, np.array([0, 1, 2, 3]), 3)
    with pytest.raises(ValueError, match="diverged"):
        classification_metrics(np.full((4, 3), np.nan), np.zeros(4, int), 3)
