"""--set parsing and typed overrides."""

from __future__ import annotations

import pytest

from npidbench.config import build_config, parse_set_options
from npidbench.errors import BadInput
from npidbench.tasks import knn


def test_precedence_and_types():
    config = build_config(
        knn.Config,
        {"ks": [10, 20]},
        {"crop": 32, "resize": 40},
        parse_set_options(["ks=[1,2,3]", "temperature=0.1"]),
    )
    assert config.ks == (1, 2, 3) and config.temperature == 0.1 and config.crop == 32


def test_comma_lists_and_ints_as_floats():
    config = build_config(knn.Config, parse_set_options(["ks=5,7", "temperature=1"]))
    assert config.ks == (5, 7) and config.temperature == 1.0


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("nokey", "not key=value"),
        ("=3", "not key=value"),
        ("bogus=1", "unknown setting 'bogus'.*valid keys"),
        ("ks=abc", "not an integer"),
        ("temperature=hot", "not a number"),
        ("ks=[0]", "positive"),
        ("temperature=-1", "positive number"),
        ("temperature=nan", "not a finite number"),
        ("crop=-1", "at least 1"),
        ("crop=300", "cannot exceed"),
        ("layer=Feature1", "AvgPool"),
    ],
)
def test_bad_values_are_refused_with_the_key(item, message):
    with pytest.raises(BadInput, match=message):
        build_config(knn.Config, parse_set_options([item]))


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "1e999"])
def test_non_finite_numbers_are_refused(raw):
    from npidbench.tasks import semisup

    with pytest.raises(BadInput, match="not a finite number"):
        build_config(semisup.Config, parse_set_options([f"lrs=[0.01,{raw}]"]))
