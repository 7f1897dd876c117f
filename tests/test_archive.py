"""Archive predict on Ray Data (a local 2-CPU Ray cluster): the plain predict's decisions, resumable."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import CLASSES, make_image
from PIL import Image

from defectscope.runtime.predict import predict

ray = pytest.importorskip("ray", reason="the ray extra: pip install 'defectscope[ray]'")
pq = pytest.importorskip("pyarrow.parquet")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def make_archive(root: Path, n: int) -> None:
    rng = np.random.default_rng(7)
    for i in range(n):
        p = root / f"tool{i % 3}" / f"img_{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_image(CLASSES[i % 3], rng, size=24)).save(p)
    (root / "tool0" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")


def test_ray_predict_matches_predict_and_resumes(station_model, local_ray, tmp_path):
    from defectscope.runtime.archive import archive_predict

    src, out = tmp_path / "archive", tmp_path / "ray_out"
    make_archive(src, 45)
    predict(station_model, [src], recursive=True, fmt="csv", out=tmp_path / "plain.csv", runtime="onnxruntime",
            precision="fp32")  # what the archive's Predictor runs (auto may take the int8 backbone)
    with open(tmp_path / "plain.csv", newline="") as f:
        reader = csv.DictReader(f)
        plain = {r["image"]: r for r in reader}
        header = reader.fieldnames

    first = archive_predict(station_model, [src], out, partition_size=10, actors=2)
    assert first["images"] == 46 and first["partitions"] == 5 and first["written"] == 5
    table = pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()
    assert len(table) == 46 and list(table[0]) == header  # the same columns
    got = {Path(r["image"]).resolve(): r for r in table}
    assert got.keys() == {Path(k).resolve() for k in plain}
    for image, row in plain.items():
        r = got[Path(image).resolve()]
        assert r["decision"] == row["decision"] and (r["top_class"] or "") == row["top_class"]
        assert r["confidence"] == pytest.approx(float(row["confidence"])) if row["confidence"] else True
    broken = got[(src / "tool0" / "truncated.png").resolve()]
    assert broken["decision"] == "_unreadable" and "truncated.png" in (broken["error"] or "")

    # A job stopped after some partitions: the finished ones stay, only the missing one is done again.
    kept = {p: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    missing = sorted(kept)[2]
    os.unlink(missing)
    del kept[missing]
    again = archive_predict(station_model, [src], out, partition_size=10, actors=2)
    assert again["done_before"] == 4 and again["written"] == 1 and missing.exists()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert pq.read_table(sorted(out.glob("part-*.parquet"))).num_rows == 46

    # Other inputs into the same folder are refused, not mixed in.
    (src / "tool1" / "new.png").write_bytes((src / "tool1" / "img_001.png").read_bytes())
    with pytest.raises(Exception, match="another job"):
        archive_predict(station_model, [src], out, partition_size=10)
