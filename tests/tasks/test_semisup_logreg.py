"""semisup's logistic-regression method (iBOT's protocol): the objective it minimises, how scores
map to labels, and the runs on a ResNet (its global feature) with both selections."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from npidbench.tasks.semisup_logreg import fit_and_score, fit_logistic_regression

from helpers import cli, one_error_line, run_preset


def test_the_fit_is_the_minimum_of_ibots_objective():
    """cyanure's objective, mean cross-entropy + lambda / 2 ||W||^2 (no intercept): its gradient
    vanishes at scikit-learn's solution for C = 1 / (n lambda)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 6)).astype(np.float32)
    y = rng.integers(0, 3, 90)
    lambd = 0.1
    classifier = fit_logistic_regression(x, y, lambd, max_iter=2000)
    assert classifier.intercept_.tolist() == [0.0, 0.0, 0.0]
    weights = torch.tensor(classifier.coef_, dtype=torch.float64, requires_grad=True)
    inputs = torch.from_numpy(x).double()
    loss = (
        torch.nn.functional.cross_entropy(inputs @ weights.T, torch.from_numpy(y))
        + lambd / 2 * weights.pow(2).sum()
    )
    (gradient,) = torch.autograd.grad(loss, weights)
    assert gradient.abs().max() < 1e-4
    # another C would be another optimum: the mapping is what the test checks
    other = fit_logistic_regression(x, y, lambd * 10, max_iter=2000)
    assert np.abs(other.coef_ - classifier.coef_).max() > 1e-2


def test_scores_follow_the_labels_not_the_fitted_columns():
    """Classes absent from the labelled images have no column: their test images are misses."""
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]], dtype=np.float32)
    y = np.array([2, 5, 2, 5])
    judge = (np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32), np.array([2, 5, 7]))
    scores = fit_and_score((x, y), judge, lambd=0.01, max_iter=500)
    assert scores["top1"] == pytest.approx(100 * 2 / 3, abs=1e-3)
    assert scores["top5"] == pytest.approx(100 * 2 / 3, abs=1e-3)  # label 7 is never in the top k


@pytest.mark.parametrize("selection", ["test", "heldout"])
def test_a_resnet_runs_the_logistic_regression_on_its_global_feature(random_checkpoint, tmp_path, selection):
    record = run_preset(
        "semisup-imagenet-10pct-logreg", random_checkpoint, tmp_path, [f"selection={selection}"]
    )
    assert record["protocol"] == "semisup-logreg" and record["details"]["layers"] == ["AvgPool"]
    metrics = record["metrics"]
    assert set(metrics["grid"]) == {"logreg-lambda0.01", "logreg-lambda0.1", "logreg-lambda1"}
    assert metrics["finetuned_config"].endswith(metrics["chosen"])
    if selection == "test":  # the best lambda on val is the one reported
        assert metrics["top1"] == max(s["top1"] for s in metrics["grid"].values())
    else:
        assert record["details"]["selected_on"].startswith("held-out")


def test_a_bad_lambda_is_one_line(random_checkpoint, results_dir, capsys):
    assert cli("run", "semisup-imagenet-1pct-logreg", str(random_checkpoint), "--set", "lambdas=[0]") == 2
    assert "lambdas must be positive" in one_error_line(capsys.readouterr().err)


def test_another_method_than_the_presets_is_one_line(random_checkpoint, results_dir, capsys):
    assert cli("run", "semisup-imagenet-1pct", str(random_checkpoint), "--set", "method=logreg") == 2
    assert "semisup-imagenet-1pct runs method=finetune" in one_error_line(capsys.readouterr().err)
