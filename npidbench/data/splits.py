"""The one shape every dataset adapter returns: labelled image files of one split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DatasetSplit:
    """Image files with integer labels, plus what identifies them for the feature cache."""

    dataset: str  # imagenet, places205, inat18, voc07, ...
    split: str  # train, val, trainval, test, ...
    root: Path
    samples: list[tuple[str, int]]
    classes: list[str]
    synthetic: bool
    fingerprint: str  # content identity: a changed dataset never reuses cached features

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def display_name(self) -> str:
        """How records and tables name it: synthetic data says so (datasets issue)."""
        return f"{self.dataset} (synthetic)" if self.synthetic else self.dataset
