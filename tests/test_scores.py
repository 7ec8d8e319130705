"""Scores beyond accuracy, checked against computations written out here."""

import json

import numpy as np
import pytest
import torch
from test_simulation import rows
from test_spend_report import simulate
from torch import nn

from privet.common.config import CONFIGS_DIR, load_config
from privet.common.data import datasets
from privet.common.evaluation import score
from privet.common.models import build_model


class Fixed(nn.Module):
    """Returns the logits it was given, row by row."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.as_tensor(logits, dtype=torch.float32)

    def forward(self, x):
        return self.logits[x[:, 0].long()]


def _by_hand(logits, labels):
    predicted = logits.argmax(1)
    classes = range(logits.shape[1])
    recall = [np.mean(predicted[labels == c] == c) for c in classes if (labels == c).any()]
    f1 = []
    for c in classes:
        tp = np.sum((predicted == c) & (labels == c))
        fp, fn = np.sum((predicted == c) & (labels != c)), np.sum((predicted != c) & (labels == c))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return np.mean(recall), np.mean(f1)


def _auc(scores, positive):
    """The probability that a positive row scores above a negative one (ties: half)."""
    pos, neg = scores[positive], scores[~positive]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


@pytest.mark.parametrize("classes", [2, 3])
def test_scores_are_the_textbook_definitions(classes):
    rng = np.random.default_rng(classes)
    labels = rng.integers(0, classes, 200)
    logits = rng.normal(size=(200, classes)) + 1.5 * np.eye(classes)[labels]
    features = np.arange(200, dtype=np.float32)[:, None]
    scores = score(Fixed(logits), features, labels.astype(np.int64), classes)
    balanced, f1 = _by_hand(logits, labels)
    assert scores.accuracy == pytest.approx(np.mean(logits.argmax(1) == labels))
    assert scores.balanced_accuracy == pytest.approx(balanced)
    assert scores.macro_f1 == pytest.approx(f1)
    assert scores.majority == pytest.approx(np.bincount(labels).max() / 200)
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected_auc = np.mean([_auc(probabilities[:, c], labels == c) for c in range(classes)]) \
        if classes > 2 else _auc(probabilities[:, 1], labels == 1)
    assert scores.auc == pytest.approx(expected_auc)


def test_auc_is_undefined_not_wrong_when_a_class_is_absent():
    labels = np.zeros(10, dtype=np.int64)
    scores = score(Fixed(np.random.default_rng(0).normal(size=(10, 2))),
                   np.arange(10, dtype=np.float32)[:, None], labels, 2)
    assert np.isnan(scores.auc) and scores.majority == 1.0


def test_a_run_reports_the_scores_of_its_saved_model_and_the_majority_baseline(tmp_path):
    summary, stdout = simulate(tmp_path / "run")
    last = rows(tmp_path / "run" / "rounds.csv")[-1]
    cfg = load_config(CONFIGS_DIR / "tiny.toml")
    transform = (tmp_path / "run" / "transform.json").read_text()
    test = datasets.test_data(cfg, transform)
    model = build_model(cfg.train, test.features.shape[1:], datasets.num_classes(cfg))
    model.load_state_dict(torch.load(tmp_path / "run" / "model.pt")["state_dict"])
    with torch.no_grad():
        logits = model(torch.from_numpy(test.features)).numpy()
    balanced, f1 = _by_hand(logits, test.labels)
    assert float(last["test_balanced_accuracy"]) == pytest.approx(balanced, abs=1e-5)
    assert float(last["test_macro_f1"]) == pytest.approx(f1, abs=1e-5)
    majority = np.bincount(test.labels).max() / len(test.labels)
    assert float(last["majority_baseline"]) == pytest.approx(majority, abs=1e-5)
    assert summary["scores"]["majority_baseline"] == pytest.approx(majority, abs=1e-5)
    assert f"majority class {majority:.4f}" in stdout and "ROC AUC" in stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["scores"]["test_auc"] > 0.5


@pytest.mark.parametrize("classes", [2, 3, 10])
def test_numpy_scores_equal_scikit_learns(classes):
    """privet's balanced accuracy, macro F1 and ROC AUC (numpy, common.evaluation) against
    scikit-learn's own functions: with ties in the scores, classes never predicted, a class
    absent from the labels (AUC: NaN, as scikit-learn refuses)."""
    from sklearn import metrics

    from privet.common.evaluation import balanced_accuracy, macro_f1, roc_auc

    rng = np.random.default_rng(classes)
    for trial in range(30):
        n = int(rng.integers(2, 400))
        labels = rng.integers(0, classes, n)
        if trial % 7 == 3:
            labels[labels == classes - 1] = 0  # a class absent
        raw = rng.integers(0, 4, (n, classes)) if trial % 2 else rng.normal(size=(n, classes))
        probabilities = torch.softmax(torch.as_tensor(raw, dtype=torch.float64), 1).numpy()
        predicted = probabilities.argmax(1)
        if trial % 5 == 1:
            predicted[:] = 0  # classes never predicted
        assert balanced_accuracy(labels, predicted, classes) == pytest.approx(
            metrics.balanced_accuracy_score(labels, predicted), abs=1e-12)
        assert macro_f1(labels, predicted, classes) == pytest.approx(metrics.f1_score(
            labels, predicted, average="macro", labels=list(range(classes)), zero_division=0),
            abs=1e-12)
        try:
            expected = (metrics.roc_auc_score(labels, probabilities[:, 1]) if classes == 2
                        else metrics.roc_auc_score(labels, probabilities, multi_class="ovr",
                                                   labels=list(range(classes))))
        except ValueError:
            expected = float("nan")
        assert roc_auc(labels, probabilities) == pytest.approx(expected, abs=1e-12,
                                                               nan_ok=True)
