"""The tolerance rule of `make spread` on hand-made ranges, and its re-derivation in place."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from reclip_core import spread

COLUMNS = ["table", "row", "label", "column", "committed", "machine_min", "machine_max", "seed_mean", "seed_sd",
           "seed_min", "seed_max", "same_text", "tolerance"]


def _rows() -> pd.DataFrame:
    return pd.DataFrame([
        # machine range wider than the seeds'
        ["known/05_benchmark.csv", 0, "a", "mIoU", "50.0", 40.0, 60.0, 50.0, 1.0, 49.0, 51.0, False, 0.0],
        # seed range wider than the machines': another CPU may land where another seed did
        ["known/05_benchmark.csv", 1, "b", "mIoU", "50.0", 49.5, 50.5, 45.0, 5.0, 40.0, 55.0, False, 0.0],
        # both below the printed precision (.1f: half a unit is 0.05)
        ["known/05_benchmark.csv", 2, "c", "mIoU", "50.0", 50.0, 50.0, 50.0, 0.0, 50.0, 50.0, False, 0.0],
        # a .3f table's floor
        ["known/05_bias.csv", 0, "d", "class TVD", "0.1", 0.1, 0.1, 0.1, 0.0, 0.1, 0.1, False, 0.0],
        # a text cell has no tolerance
        ["known/05_bias.csv", 0, "d", "both lower", "no", None, None, None, None, None, None, True, None],
    ], columns=COLUMNS)


def test_tolerance_covers_every_measured_run_and_the_range_width_beyond():
    t = spread.tolerances(_rows())
    # [40, 60] and 20 beyond either side, around 50; [40, 55] and 15 beyond, around 50
    assert t.iloc[0] == 30.0 and t.iloc[1] == 25.0
    assert math.isclose(t.iloc[2], 0.05) and math.isclose(t.iloc[3], 0.0005)
    assert math.isnan(t.iloc[4])


def test_rederiving_rewrites_only_the_tolerance_column(tmp_path):
    path = tmp_path / "spread.csv"
    _rows().to_csv(path, index=False)
    before = pd.read_csv(path, keep_default_na=False, na_values=[""])
    moved = spread.rederive_tolerances(path)
    after = pd.read_csv(path, keep_default_na=False, na_values=[""])
    assert len(moved) == 4 and "row 1 (b)" in moved[1] and "25" in moved[1]
    pd.testing.assert_frame_equal(after.drop(columns="tolerance"), before.drop(columns="tolerance"))
    assert after.tolerance.iloc[1] == 25.0
    assert spread.rederive_tolerances(path) == []  # a second pass changes nothing


def test_a_table_without_the_ranges_is_refused_and_left_as_it_was(tmp_path):
    path = tmp_path / "spread.csv"
    _rows().drop(columns=["seed_min", "seed_max"]).to_csv(path, index=False)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"no column seed_min, seed_max.*run `make spread`"):
        spread.rederive_tolerances(path)
    assert path.read_bytes() == before


def test_a_missing_table_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"no .*spread.csv to re-derive; run `make spread` first"):
        spread.rederive_tolerances(tmp_path / "spread.csv")
    assert not (tmp_path / "spread.csv").exists()
