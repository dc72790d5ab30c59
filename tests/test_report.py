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
