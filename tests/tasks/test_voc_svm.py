"""VOC07 SVM / low-shot protocol: batched vs the anchors' sklearn path, features directories, the
CLI end to end, the report row and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from npidbench.metrics import voc_ap, voc_ap_columns
from npidbench.solvers.voc_svm import cost_list, draw_lowshot, full_svm, lowshot_svm
from npidbench.tasks import voc_svm as voc_svm_task

from helpers import cli, one_error_line


def voc_like(n: int, classes: int, dims: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features with class structure and multi-label VOC-convention labels (some difficult)."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random((n, classes)) < 0.25, 1, -1)
    labels[rng.random((n, classes)) < 0.03] = 0
    centres = rng.normal(size=(classes, dims))
    x = rng.normal(size=(n, dims)) * 1.6 + (labels == 1) @ centres + 2.0
    return x.astype(np.float32), labels.astype(np.int8)


def test_cost_lists_follow_the_anchors():
    assert len(cost_list("mms")) == 19 and cost_list("mms")[:4] == [1.0, 10.0, 100.0, 0.0625]
    assert len(cost_list("fair")) == 26 and cost_list("fair")[0] == pytest.approx(1e-7)
    assert len(cost_list("vissl")) == 11


def test_column_ap_equals_the_one_class_ap_with_ties_and_difficult():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=(40, 30)).astype(float)  # many ties
    labels = rng.choice([1, -1, -1, 0], size=(40, 30))
    labels[0] = 1
    expected = [voc_ap(scores[:, j], labels[:, j]) for j in range(30)]
    np.testing.assert_allclose(voc_ap_columns(scores, labels), expected)
    # and the one-class version itself on a hand-made case: + (tie of + and -) - +
    assert voc_ap(np.array([4.0, 3, 3, 2, 1]), np.array([1, 1, -1, -1, 1])) == pytest.approx(
        (1 + 2 / 3 + 3 / 5) / 3
    )


def test_batched_matches_the_sklearn_path():
    train_x, train_y = voc_like(240, 4, 30, seed=1)
    rng = np.random.default_rng(3)
    pick = rng.permutation(240)
    test_x, test_y = train_x[pick[:100]] + rng.normal(size=(100, 30)).astype(np.float32), train_y[pick[:100]]
    costs = cost_list("vissl")
    ours = full_svm(train_x, train_y, test_x, test_y, costs)
    ref = full_svm(train_x, train_y, test_x, test_y, costs, solver="sklearn")
    assert ours.map == pytest.approx(ref.map, abs=0.2)
    # Where liblinear converges (C <= 10 here) the CV APs agree; at C = 50..1000 it stops at
    # tol 1e-4 / max_iter short of the optimum, and the batched solver is the more converged.
    small = [j for j, c in enumerate(costs) if c <= 10]
    np.testing.assert_allclose(ours.cv_ap[:, small], ref.cv_ap[:, small], atol=2e-3)
    assert sum(a == b for a, b in zip(ours.chosen_costs, ref.chosen_costs, strict=True)) >= 3
    assert 20 < ours.map < 100


def test_the_primal_and_gram_methods_give_the_same_protocol_numbers(monkeypatch):
    """Same problems, two bases: the CV APs, test APs and chosen costs agree; the primal method
    never forms an N x N matrix, and classes solved in groups equal classes solved together."""
    import npidbench.solvers.voc_svm as voc

    train_x, train_y = voc_like(300, 5, 24, seed=8)
    test_x, test_y = voc_like(120, 5, 24, seed=9)
    costs = cost_list("mms")
    gram = full_svm(train_x, train_y, test_x, test_y, costs, method="gram")
    assert voc.pick_method(300, 24) == "primal" and voc.pick_method(300, 299) == "gram"

    def no_gram(*args, **kwargs):
        raise AssertionError("the primal method formed a Gram matrix")

    monkeypatch.setattr(voc, "gram_matrix", no_gram)
    primal = full_svm(train_x, train_y, test_x, test_y, costs)  # auto: N > D + 1
    assert gram.stats["method"] == "gram" and primal.stats["method"] == "primal"
    np.testing.assert_allclose(primal.cv_ap, gram.cv_ap, atol=1e-6)
    np.testing.assert_allclose(primal.test_ap, gram.test_ap, atol=1e-4)
    assert primal.chosen_costs == gram.chosen_costs and primal.map == pytest.approx(gram.map, abs=1e-4)
    monkeypatch.setattr(voc, "COLUMN_BLOCK_ELEMENTS", 300 * 4 * 2)  # two classes per group
    grouped = full_svm(train_x, train_y, test_x, test_y, costs)
    assert grouped.stats["class_groups"] == 3
    np.testing.assert_allclose(grouped.cv_ap, primal.cv_ap, atol=1e-9)
    np.testing.assert_allclose(grouped.test_ap, primal.test_ap, atol=1e-9)
    with pytest.raises(ValueError, match="unknown method"):
        full_svm(train_x, train_y, test_x, test_y, costs, method="dual")  # type: ignore[arg-type]


def test_lowshot_draws_are_seeded_and_never_difficult():
    _, labels = voc_like(400, 3, 4, seed=4)
    a = draw_lowshot(labels, 2, 0, 7, [0, 1, 2])
    b = draw_lowshot(labels, 2, 0, 7, [0, 1, 2])
    c = draw_lowshot(labels, 2, 1, 7, [0, 1, 2])
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    for cls, subset in enumerate(a):
        assert len(subset) == 40 and len(set(subset)) == 40
        assert (labels[subset[:2], cls] == 1).all() and (labels[subset[2:], cls] == -1).all()
    with pytest.raises(ValueError, match="needs 200 positives"):
        draw_lowshot(labels, 200, 0, 7, [0])


@pytest.mark.parametrize("selection", ["test", "heldout"])
def test_lowshot_batched_matches_sklearn(selection):
    train_x, train_y = voc_like(400, 3, 20, seed=5)
    rng = np.random.default_rng(6)
    test_x, test_y = train_x[:150] + rng.normal(size=(150, 20)).astype(np.float32), train_y[:150]
    # k = 8: 160-image subsets, over a quarter of trainval: the shared-basis path
    kwargs = dict(layer="F", ks=(1, 4, 8), samples=2, seed=3, selection=selection)
    costs = cost_list("vissl")
    ours = lowshot_svm(train_x, train_y, test_x, test_y, costs, **kwargs)
    ref = lowshot_svm(train_x, train_y, test_x, test_y, costs, solver="sklearn", **kwargs)
    np.testing.assert_allclose(ours.maps[:2], ref.maps[:2], atol=0.2)  # k = 1, 4: every cost
    # k = 8: liblinear stops short of the optimum at the largest costs (tol 1e-4 / max_iter), so
    # compare where it converges, as in the full-SVM test
    small = [j for j, c in enumerate(costs) if c <= 10]
    np.testing.assert_allclose(ours.maps[2][:, small], ref.maps[2][:, small], atol=0.2)
    summary = ours.summary()
    assert set(summary) == {"1", "4", "8"}
    assert summary["4"]["min"] <= summary["4"]["mean"] <= summary["4"]["max"]
    assert summary["4"]["cost"] in costs


def write_features_dir(root: Path, layers: list[str] | None = None, fair: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    x, y = voc_like(480, 3, 24, seed=8)
    rng = np.random.default_rng(9)
    test_x = x[:200] + rng.normal(size=(200, 24)).astype(np.float32)

    def convention(labels: np.ndarray) -> np.ndarray:
        return np.select([labels == 1, labels == -1], [1, 0], -1) if fair else labels

    np.save(root / "trainval_labels.npy", convention(y).astype(np.int8))
    np.save(root / "test_labels.npy", convention(y[:200]).astype(np.int8))
    if layers is None:
        np.save(root / "trainval.npy", x)
        np.save(root / "test.npy", test_x)
    else:
        for i, layer in enumerate(layers):
            np.save(root / f"trainval_{layer}.npy", x * (i + 1) + i)
            np.save(root / f"test_{layer}.npy", test_x * (i + 1) + i)
        (root / "layers.json").write_text(json.dumps(layers))
    return root


SMALL = ["--set", "lowshot_ks=[1,2]", "--set", "lowshot_samples=2", "--set", "costs=vissl"]


def test_features_dir_end_to_end_with_report_and_plot(tmp_path, results_dir, capsys):
    fdir = write_features_dir(tmp_path / "feats", layers=["Feature4", "Feature5"])
    # same settings for both parts: a row is one protocol variant (here: the small low-shot)
    assert cli("run", "voc-svm-full", "--features-dir", str(fdir), *SMALL) == 0
    full = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text())
    assert set(full["metrics"]["layers"]) == {"Feature4", "Feature5"}
    assert full["model"]["sha256"] and full["model"]["features_dir"] == str(fdir)
    best = full["metrics"]["best_layer"]
    # voc-lowshot takes the best layer of that record (same features, same data)
    assert cli("run", "voc-lowshot", "--features-dir", str(fdir), *SMALL) == 0
    low = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text())
    assert low["metrics"]["lowshot"]["layer"] == best and low["seeds"] == [0]
    assert set(low["metrics"]["lowshot"]["k"]) == {"1", "2"}
    assert cli("report", "--lowshot-plot", str(tmp_path / "curve.svg")) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "Best Layer" in line)
    assert [c.strip() for c in header.strip("|").split("|")][:4] == ["Model", "Config", "Best Layer", "SVM"]
    row = next(line for line in out.splitlines() if line.startswith("| feats"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == best and cells[3] == f"{full['metrics']['svm']:.2f}"  # one row from both records
    assert cells[4] == f"{low['metrics']['lowshot']['k']['1']['mean']:.2f}"
    assert (tmp_path / "curve.svg").read_text().lstrip().startswith("<?xml")


def test_lowshot_layer_names_match_in_any_case(tmp_path, results_dir, capsys):
    """lowshot_layer=feature4 is Feature4, as layers= matches names (the record keeps the
    directory's spelling); a name no layer has is still refused."""
    fdir = write_features_dir(tmp_path / "feats", layers=["Feature4", "Feature5"])
    assert cli("run", "voc-lowshot", "--features-dir", str(fdir), *SMALL, "--set", "lowshot_layer=feature4") == 0
    record = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text())
    assert record["metrics"]["lowshot"]["layer"] == "Feature4"
    assert cli("run", "voc-lowshot", "--features-dir", str(fdir), *SMALL, "--set", "lowshot_layer=feature9") == 2
    assert "has no layer feature9" in capsys.readouterr().err


def test_voc_svm_from_a_checkpoint_on_the_synthetic_data(random_checkpoint, results_dir, capsys, monkeypatch):
    args = ["--set", "layers=[feature5]", "--set", "lowshot_ks=[1]", "--set", "lowshot_samples=1"]
    args += ["--set", "resize=64", "--set", "size=64"]  # below the profile's 96: the same grid, less work
    # Two costs: the lists' solves (tested in tests/solvers) were 50 s of this end-to-end check
    monkeypatch.setattr(voc_svm_task, "cost_list", lambda name: [1.0, 0.5**4])
    assert cli("run", "voc-svm", str(random_checkpoint), *args) == 0
    record = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text())
    assert record["dataset"]["synthetic"] and record["dataset"]["train"]["images"] > 1000
    # layers= matches case-insensitively (as the linear probes' does); the record spells it as the backbone
    assert list(record["metrics"]["layers"]) == ["Feature5"] and record["metrics"]["best_layer"] == "Feature5"
    assert 5 < record["metrics"]["svm"] < 100
    assert record["metrics"]["lowshot"]["layer"] == "Feature5"
    # precision and solver are part of how the number was made: named in the record
    assert record["details"]["precision"] == "fp32"
    assert record["details"]["solver"].startswith("npidbench batched")


def _corrupt(kind: str, root: Path) -> str:
    if kind == "nan":
        x = np.load(root / "trainval.npy")
        x[5, 3] = np.nan
        np.save(root / "trainval.npy", x)
        return "trainval.npy has NaN"
    if kind == "rows":
        np.save(root / "test.npy", np.load(root / "test.npy")[:-1])
        return "test.npy has 199 rows but test_labels.npy has 200"
    if kind == "values":
        y = np.load(root / "trainval_labels.npy")
        y[0, 0] = 2
        np.save(root / "trainval_labels.npy", y)
        return "trainval_labels.npy has values [2]"
    if kind == "shape":
        np.save(root / "test_labels.npy", np.zeros(200, dtype=np.int8))
        return "test_labels.npy must be an (N, C) label matrix"
    if kind == "convention":  # VOC's 1/-1/0 given where the FAIR 1/0/-1 is expected
        write_features_dir(root, fair=False)
        return "try --set labels=voc"
    if kind == "missing":
        (root / "test.npy").unlink()
        return "test.npy is missing"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["nan", "rows", "values", "shape", "convention", "missing"])
def test_bad_features_dir_is_one_line_naming_the_file(kind, tmp_path, results_dir, capsys):
    fdir = write_features_dir(tmp_path / "feats")
    message = _corrupt(kind, fdir)
    assert cli("run", "voc-svm-full", "--features-dir", str(fdir)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line, line
    assert not results_dir.exists() or not list(results_dir.iterdir())


def test_voc_convention_is_read_with_labels_voc(tmp_path, results_dir, capsys):
    fdir = write_features_dir(tmp_path / "feats", fair=False)
    assert (
        cli("run", "voc-svm-full", "--features-dir", str(fdir), "--set", "labels=voc", "--set", "costs=vissl")
        == 0
    )
    record = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text())
    assert record["dataset"]["label_convention"] == "voc" and record["metrics"]["best_layer"] == "features"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("solver=liblinear", "solver='liblinear' is not one of batched, sklearn"),
        ("costs=abc", "costs='abc' is not one of mms, fair, vissl"),
        ("selection=val", "selection='val' is not one of test, heldout"),
        ("labels=x", "labels='x' is not one of fair, voc"),
        ("lowshot_layer=Feature9", "has no layer Feature9"),
    ],
)
def test_bad_settings_are_refused(setting, message, tmp_path, results_dir, capsys):
    fdir = write_features_dir(tmp_path / "feats")
    assert cli("run", "voc-svm", "--features-dir", str(fdir), "--set", setting) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_setting_choices_are_the_literals_of_the_config():
    """The config's Literal fields are the one list of choices: cost lists, solvers, conventions."""
    from typing import get_args

    import npidbench.tasks.voc_svm as task
    from npidbench.features_dir import CONVENTIONS, LabelConvention
    from npidbench.solvers.voc_svm import USER_COSTS, CostListName, SolverName

    assert tuple(USER_COSTS) == get_args(CostListName) == ("mms", "fair", "vissl")
    assert tuple(task.SOLVERS) == get_args(SolverName) == ("batched", "sklearn")
    assert CONVENTIONS == get_args(LabelConvention) == ("fair", "voc")
    x, y = voc_like(60, 2, 4, seed=2)
    with pytest.raises(ValueError, match="unknown solver 'liblinear'"):
        full_svm(x, y, x, y, [1.0], solver="liblinear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown solver 'liblinear'"):
        lowshot_svm(x, y, x, y, [1.0], layer="F", ks=(1,), solver="liblinear")  # type: ignore[arg-type]


def test_ties_between_costs_go_to_the_first_in_list_order():
    from npidbench.solvers.voc_svm import choose

    cv = np.array([[0.5, 0.7, 0.7, 0.1], [0.9, 0.9, 0.9, 0.9]])
    assert choose(cv).tolist() == [1, 0]


def test_an_interrupted_full_svm_resumes_at_the_next_layer(tmp_path, results_dir, capsys, monkeypatch):
    import npidbench.tasks.voc_svm as task

    fdir = write_features_dir(tmp_path / "feats", layers=["Feature4", "Feature5"])
    real = task.full_svm
    calls: list[int] = []

    def interrupted(train_x, *args, **kwargs):
        calls.append(train_x.shape[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(train_x, *args, **kwargs)

    monkeypatch.setattr(task, "full_svm", interrupted)
    assert cli("run", "voc-svm-full", "--features-dir", str(fdir), "--set", "costs=vissl") == 130  # Ctrl-C
    assert not results_dir.exists() or not list(results_dir.iterdir())
    monkeypatch.setattr(task, "full_svm", real)
    counted: list[int] = []
    monkeypatch.setattr(task, "full_svm", lambda x, *a, **k: counted.append(1) or real(x, *a, **k))
    assert cli("run", "voc-svm-full", "--features-dir", str(fdir), "--set", "costs=vissl") == 0
    assert counted == [1]  # Feature4 came from the interrupted run
    record = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text())
    assert set(record["metrics"]["layers"]) == {"Feature4", "Feature5"}
    # a completed run leaves nothing behind: the next run computes both layers again
    counted.clear()
    assert cli("run", "voc-svm-full", "--features-dir", str(fdir), "--set", "costs=vissl") == 0
    assert counted == [1, 1]


def test_features_dir_runs_the_published_protocol_not_the_synthetic_profile(tmp_path, results_dir, capsys):
    """A user's real features: 5 low-shot samples, 256/224 extraction settings, no [synthetic]."""
    fdir = write_features_dir(tmp_path / "feats")
    assert cli("run", "voc-svm-full", "--features-dir", str(fdir)) == 0
    record = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1]).read_text())
    assert record["details"]["profile"] == {"name": "protocol"}
    assert record["config"]["lowshot_samples"] == 5 and record["config"]["resize"] == 256
    assert record["variant"] == "" and record["dataset"]["synthetic"] is False


def test_the_synthetic_profile_follows_the_data_read(tmp_path):
    from npidbench.data import reads_synthetic_data
    from npidbench.data.synthetic import ensure_suite

    from helpers import tiny_imagefolder

    assert reads_synthetic_data("voc07", None)  # the embedded suite
    assert reads_synthetic_data("voc0712", ensure_suite())  # a suite written by `data synth`
    tiny_imagefolder(tmp_path / "imagenet", classes=2, per_class=2, split="train")
    (tmp_path / "imagenet" / "val").mkdir()
    assert not reads_synthetic_data("imagenet", tmp_path)  # real data
    assert not reads_synthetic_data("voc07", tmp_path)  # absent: the task reports it
