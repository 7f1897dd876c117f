"""The line install: a fresh clone, a fresh venv, ``pip install '.[line]'`` - and no PyTorch anywhere.

Builds the line profile the way a line PC gets it and runs ``defectscope predict`` and ``sort`` there with
a model exported by the full install. pip may reuse wheels from its cache, so a warm run takes about a
minute; a cold one downloads onnxruntime, OpenVINO and the web stack once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from defectscope.onnx_export.exporter import export

REPO = Path(__file__).resolve().parents[1]
# scipy is not here: the station's SPC statistics (binomial test, Clopper-Pearson) need it on the line too.
TRAIN_ONLY = ("torch", "torchvision", "timm", "pandas", "sklearn", "onnx", "matplotlib")


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def line_venv(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout of defectscope")
    root = tmp_path_factory.mktemp("line")
    # A clean checkout: what is committed, nothing of this working tree's build or venv leftovers.
    _run(["git", "clone", "--quiet", "--depth", "1", f"file://{REPO}", str(root / "src")])
    _run([sys.executable, "-m", "venv", str(root / "venv")])
    python = root / "venv" / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"{root / 'src'}[line]"])
    return root / "venv"


@pytest.mark.slow
def test_line_install_predicts_and_sorts_without_torch(line_venv, trained_run, folder_dataset, tmp_path):
    python, cli = line_venv / "bin" / "python", line_venv / "bin" / "defectscope"
    code = ("import importlib.util, json; "
            f"print(json.dumps([m for m in {TRAIN_ONLY!r} if importlib.util.find_spec(m) is not None]))")
    assert json.loads(_run([str(python), "-c", code]).stdout) == [], "the line install pulled in training packages"

    model = tmp_path / "model" / "model.onnx"
    export(trained_run, model)  # the workstation's side, with its record removed:
    sidecar = json.loads(model.with_suffix(".json").read_text())
    sidecar.pop("runtime_selection")  # the line PC must measure and record its own choice
    model.with_suffix(".json").write_text(json.dumps(sidecar))
    images = sorted(folder_dataset.rglob("*.png"))[:6]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the venv's defectscope

    out = _run([str(cli), "predict", str(model), *map(str, images), "--format", "jsonl"], env=env, cwd=tmp_path)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["image"] for r in rows] == list(map(str, images))
    cache = json.loads(model.with_name("model.runtime.json").read_text())
    (record,) = cache["machines"].values()
    assert {"onnxruntime_fp32", "openvino_fp32"} <= set(record["candidates"])

    out = _run([str(cli), "predict", str(model), str(images[0]), "--runtime", "openvino", "--precision", "fp32"],
               env=env, cwd=tmp_path)
    assert json.loads(out.stdout)["decision"] == rows[0]["decision"]

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i, image in enumerate(images):
        shutil.copy(image, inbox / f"{i}_{image.name}")
    _run([str(cli), "sort", str(model), "--inbox", str(inbox), "--out", str(tmp_path / "sorted"), "--settle", "0"],
         env=env, cwd=tmp_path)
    assert list(inbox.iterdir()) == []
    assert len([p for p in (tmp_path / "sorted").rglob("*.png")]) == len(images)

    done = subprocess.run([str(cli), "train", "--data", str(folder_dataset), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "pip install 'defectscope[train]'" in done.stderr
