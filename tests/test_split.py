from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from defectscope.data.split import assign_splits
from defectscope.data.table import DataError


def _table(n_per=(100, 20, 7), groups=False):
    rows = []
    for c, n in enumerate(n_per):
        for i in range(n):
            rows.append({"path": f"/x/{c}_{i}.png", "label": f"c{c}", "split": "", "source": "",
                         "type": "mono" if i % 3 else "poly", "wafer": f"w{c}_{i // 4}" if groups else ""})
    return pd.DataFrame(rows)


def test_stratified_fractions_and_seed():
    t = assign_splits(_table(), (0.7, 0.15, 0.15), seed=3)
    ct = pd.crosstab(t["label"], t["split"])
    assert ct.loc["c0"].to_dict() == {"test": 15, "train": 70, "val": 15}
    assert ct.loc["c2", "train"] >= 4 and ct.loc["c2"].sum() == 7
    again = assign_splits(_table(), (0.7, 0.15, 0.15), seed=3)
    other = assign_splits(_table(), (0.7, 0.15, 0.15), seed=4)
    assert (t["split"] == again["split"]).all()
    assert (t["split"] != other["split"]).any()


def test_stratify_by_metadata_balances_types():
    t = assign_splits(_table((300,)), (0.5, 0.25, 0.25), seed=0, stratify=["type"])
    share = pd.crosstab(t["split"], t["type"], normalize="index")["poly"]
    assert np.allclose(share.to_numpy(), 1 / 3, atol=0.02)


def test_groups_stay_together():
    t = assign_splits(_table(groups=True), (0.6, 0.2, 0.2), seed=0, group_column="wafer")
    assert (t.groupby("wafer")["split"].nunique() == 1).all()
    assert set(t["split"]) == {"train", "val", "test"}


def test_predefined_split_is_honoured():
    t = _table()
    t.loc[:9, "split"] = "test"
    out = assign_splits(t, (0.7, 0.15, 0.15), seed=0)
    assert (out.loc[:9, "split"] == "test").all()
    assert (out["split"] != "").all()


def test_unknown_stratify_column():
    with pytest.raises(DataError, match="cannot split by column"):
        assign_splits(_table(), stratify=["nope"])


def test_four_way_split_has_a_calibration_share():
    t = assign_splits(_table((200, 100)), (0.5, 0.1, 0.2, 0.2), seed=0)
    counts = t["split"].value_counts().to_dict()
    assert counts == {"train": 150, "val": 30, "calib": 60, "test": 60}
