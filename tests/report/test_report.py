"""Report tables: exact headers, grouping by checkpoint, seeds, references, filters, formats."""

from __future__ import annotations

import pytest

from npidbench.errors import BadInput
from npidbench.report import FORMATS, build_tables, render, select

from test_results import make_record

KNN_HEADER = "| Model | Config | k=10 | k=20 | k=100 | k=200 |"


def normalise(markdown_line: str) -> str:
    return "| " + " | ".join(cell.strip() for cell in markdown_line.strip().strip("|").split("|")) + " |"


def test_knn_table_has_the_exact_header_and_synthetic_title():
    (table,) = build_tables([make_record()])
    text = render([table], "markdown")
    lines = text.splitlines()
    assert lines[0] == "### ImageNet kNN (synthetic data)"
    assert normalise(lines[2]) == KNN_HEADER
    assert normalise(lines[4]) == "| m | - | 50.00 | 51.00 | 52.00 | 53.00 |"


def test_two_checkpoints_with_one_name_are_never_merged():
    records = [
        make_record(name="npid", sha="a" * 64, top1=10),
        make_record(name="npid", sha="b" * 64, top1=20),
    ]
    (table,) = build_tables(records)
    assert sorted(table.frame["Model"]) == ["npid (aaaaaaaa)", "npid (bbbbbbbb)"]


def test_seeds_are_averaged_with_std_and_reruns_replace():
    records = [
        make_record(seeds=[0], top1=10),
        make_record(seeds=[1], top1=20),
        make_record(seeds=[1], top1=30),
    ]  # a rerun of seed 1: the latest counts
    (table,) = build_tables(records)
    assert table.frame.loc[0, "k=10"] == "20.00 ± 14.14"


def test_reference_rows_only_in_matching_real_dataset():
    synthetic = build_tables([make_record()], reference=True)
    assert len(synthetic[0].frame) == 1
    real = build_tables([make_record(synthetic=False)], reference=True)
    assert real[0].title == "ImageNet kNN"
    ref = real[0].frame[real[0].frame["Model"] == "NPID (mmselfsup)"]
    assert ref.iloc[0]["k=200"] == "42.20"


def test_real_and_synthetic_are_separate_tables_and_protocol_variants_are_named():
    tables = build_tables(
        [make_record(), make_record(synthetic=False), make_record(protocol="npid-knn-memory-bank")]
    )
    assert [t.title for t in tables] == ["ImageNet kNN", "ImageNet kNN (synthetic data)"]
    names = sorted(tables[1].frame["Model"])
    assert names == ["m", "m [npid-knn-memory-bank]"]


def test_filters():
    records = [make_record(name="npid-200ep"), make_record(name="moco", sha="c" * 64)]
    assert [r["model"]["name"] for r in select(records, model="npid*")] == ["npid-200ep"]
    assert select(records, task="knn") == records
    assert select(records, dataset="places*") == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_renders(fmt):
    text = render(build_tables([make_record(name="x_y")]), fmt)
    assert "x" in text and len(text) > 20


def test_unknown_format_is_refused():
    with pytest.raises(BadInput, match="choose one of"):
        render([], "docx")


def test_branches_variants_and_datasets_of_one_checkpoint_are_separate_rows():
    q = make_record(name="moco", top1=10)
    q["model"]["branch"] = "encoder_q"
    k = make_record(name="moco", top1=20)
    k["model"]["branch"] = "encoder_k"
    warm = make_record(name="moco", top1=30)
    warm["model"]["branch"] = "encoder_q"
    warm["variant"] = "temperature=1.0"
    (table,) = build_tables([q, k, warm])
    assert sorted(table.frame["Model"]) == [
        "moco [branch encoder_k]",
        "moco [branch encoder_q]",
        "moco [branch encoder_q] [temperature=1.0]",
    ]
    a, b = make_record(synthetic=False), make_record(synthetic=False, top1=70)
    a["dataset"]["fingerprint"], b["dataset"]["fingerprint"] = "1" * 64, "2" * 64
    (table,) = build_tables([a, b])
    assert sorted(table.frame["Model"]) == ["m [data 11111111]", "m [data 22222222]"]


def _linear_record(dataset: str, top1: dict, protocol: str = "linear-mhead", synthetic: bool = False) -> dict:
    record = make_record(synthetic=synthetic, protocol=protocol)
    record.update(task=f"linear-{dataset}", family="linear", table="linear", seeds=[0])
    record["dataset"]["name"] = dataset
    record["metrics"] = {"top1": top1, "top5": {}}
    return record


def _semisup_record(label: str, top1: float) -> dict:
    record = make_record(synthetic=False, protocol="semisup-finetune")
    record.update(task="semisup", family="semisup", table="semisup", seeds=[0])
    record["dataset"]["train"] = {"labelled": {"label": label}}
    record["metrics"] = {"top1": top1, "top5": top1 + 20, "finetuned_config": f"{label}_lr0.01-head100"}
    return record


def test_linear_and_semisup_tables_have_the_exact_headers_titles_and_references():
    heads = {
        name: 10.0 + i
        for i, name in enumerate(["Feature1", "Feature2", "Feature3", "Feature4", "Feature5", "AvgPool"])
    }
    records = [
        _linear_record("imagenet", heads),
        _linear_record("places205", heads),
        _linear_record("inat18", heads),
        _semisup_record("in1k-10pct", 50.0),
        _semisup_record("in1k-1pct", 20.0),
    ]
    tables = {t.title: t for t in build_tables(records, reference=True)}
    assert sorted(tables) == [
        "ImageNet Linear Evaluation",
        "ImageNet Semi-Supervised Classification",
        "Places205 Linear Evaluation",
        "iNaturalist2018 Linear Evaluation",
    ]
    text = render(list(tables.values()), "markdown")
    headers = {normalise(line) for line in text.splitlines() if line.startswith("| Model")}
    assert headers == {
        "| Model | Config | Feature1 | Feature2 | Feature3 | Feature4 | Feature5 | AvgPool |",
        "| Model | Pretrain Config | Fine-tuned Config | Top-1 (%) | Top-5 (%) |",
    }
    imagenet = tables["ImageNet Linear Evaluation"].frame
    assert list(imagenet.iloc[-1][2:]) == ["14.68", "31.98", "42.85", "56.95", "58.41", "57.97"]
    places = tables["Places205 Linear Evaluation"].frame
    assert list(places.iloc[-1][2:]) == ["19.98", "34.86", "41.59", "48.43", "48.71", "-"]
    assert len(tables["iNaturalist2018 Linear Evaluation"].frame) == 1  # no published NPID row
    semisup = tables["ImageNet Semi-Supervised Classification"].frame
    assert list(semisup["Fine-tuned Config"]) == [
        "in1k-1pct_lr0.01-head100",
        "in1k-10pct_lr0.01-head100",
        "in1k-1pct_lr0.01-head100",
        "in1k-10pct_lr0.01-head100",
    ]
    assert list(semisup["Top-1 (%)"]) == ["20.00", "50.00", "27.95", "57.22"]


def test_cached_linear_rows_are_marked_and_parts_fill_one_row():
    features = _linear_record("imagenet", {f"Feature{i}": 10.0 * i for i in range(1, 6)})
    avgpool = _linear_record("imagenet", {"AvgPool": 55.0})
    cached = _linear_record("imagenet", {"AvgPool": 50.0}, protocol="linear-cached")
    (table,) = build_tables([features, avgpool, cached])
    rows = {row["Model"]: row for row in table.frame.to_dict(orient="records")}
    assert rows["m"]["Feature1"] == "10.00" and rows["m"]["AvgPool"] == "55.00"
    assert rows["m [linear-cached]"]["AvgPool"] == "50.00" and rows["m [linear-cached]"]["Feature1"] == "-"


def test_bf16_rows_are_kept_apart_and_named():
    fp32, bf16 = make_record(top1=10), make_record(top1=11)
    fp32["details"] = {"precision": "fp32"}
    bf16["details"] = {"precision": "bf16-autocast"}
    (table,) = build_tables([fp32, bf16])
    assert sorted(table.frame["Model"]) == ["m", "m [bf16]"]
    # written before precision was recorded: the device and family say what ran
    from npidbench.report import record_precision

    old = {"family": "semisup", "details": {"device": "cuda:0"}}
    assert record_precision(old) == "bf16-autocast"
    assert record_precision({**old, "details": {"device": "cpu"}}) == "fp32"
    assert (
        record_precision({"family": "linear", "protocol": "linear-cached", "details": {"device": "cuda"}})
        == "fp32"
    )
    assert record_precision({"family": "knn", "details": {"device": "cuda"}}) == "fp32"


def _frozen_linear_record(protocol: str, head: str, top1: float, synthetic: bool = False) -> dict:
    record = make_record(synthetic=synthetic, protocol=f"linear-{protocol}")
    record.update(task=f"linear-imagenet-{protocol}", family="frozen-linear", table=f"linear-{protocol}")
    record["metrics"] = {"top1": top1, "top5": top1 + 10, "head": head}
    return record


def test_frozen_linear_tables_are_named_after_their_protocol_with_section_4_references():
    records = [
        _frozen_linear_record("dino", "CLS of the last 4 blocks", 70.0),
        _frozen_linear_record("mae", "CLS", 60.0),
        _frozen_linear_record("sweep", "CLS + mean patch, lr 0.001", 75.0),
        make_record(synthetic=False),
    ]
    tables = {t.title: t.frame for t in build_tables(records, reference=True)}
    assert sorted(tables) == [
        "ImageNet Linear Evaluation (DINO protocol)",
        "ImageNet Linear Evaluation (MAE protocol)",
        "ImageNet Linear Evaluation (multi-head sweep, DINOv2 protocol; best head on val)",
        "ImageNet kNN",
    ]
    dino = tables["ImageNet Linear Evaluation (DINO protocol)"].set_index("Model")
    assert list(dino.columns) == ["Config", "Head", "Top-1 (%)", "Top-5 (%)"]
    assert list(dino.loc["m"]) == ["-", "CLS of the last 4 blocks", "70.00", "80.00"]
    assert (
        dino.loc["DINO ViT-S/16", "Top-1 (%)"] == "77.00"
        and dino.loc["SwAV ResNet-50-w5", "Top-1 (%)"] == "78.50"
    )
    mae = tables["ImageNet Linear Evaluation (MAE protocol)"].set_index("Model")
    assert mae.loc["MAE ViT-B", "Top-1 (%)"] == "68.00"
    sweep = tables["ImageNet Linear Evaluation (multi-head sweep, DINOv2 protocol; best head on val)"]
    sweep = sweep.set_index("Model")
    assert sweep.loc["DINOv2 ViT-g/14 reg4", "Top-1 (%)"] == "87.10" and sweep.loc["m", "Head"].endswith(
        "lr 0.001"
    )
    knn = tables["ImageNet kNN"].set_index("Model")
    assert knn.loc["DINO ViT-S/16", "k=20"] == "74.50" and knn.loc["DINO ViT-S/16", "k=200"] == "-"
    # the published rows belong to real ImageNet only
    synthetic = build_tables([_frozen_linear_record("dino", "CLS", 50.0, synthetic=True)], reference=True)
    assert len(synthetic[0].frame) == 1
