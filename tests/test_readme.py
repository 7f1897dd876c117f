"""The README's quickstart, run as written, so the docs cannot drift from the code."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str, section: str) -> list[str]:
    text = README.read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", body, flags=re.S)


@pytest.mark.slow
def test_readme_quickstart_commands(folder_dataset, manifest_dataset, tmp_path):
    shutil.copytree(folder_dataset, tmp_path / "my_images")
    shutil.copy(manifest_dataset, tmp_path / "Y_train.csv")
    shutil.copytree(manifest_dataset.parent / "input_train", tmp_path / "input_train")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    commands = [line for block in _blocks("bash", "Quickstart on your own images")
                for line in block.splitlines() if line.strip()]
    assert len(commands) == 4
    for command in commands:
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    for run in ("first", "die"):
        metrics = json.loads((tmp_path / "runs" / run / "evaluation" / "metrics.json").read_text())
        assert metrics["n"] > 0
    (code,) = _blocks("python", "Quickstart on your own images")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_readme_yaml_config_is_valid(tmp_path):
    from defectscope.config import build_config

    (config,) = _blocks("yaml", "Models and training")
    path = tmp_path / "c.yaml"
    path.write_text(config)
    cfg = build_config(config_file=path)
    assert [p.unfreeze for p in cfg.train.phases] == ["head", "last:2", "all"]


def test_cli_help_is_instant_and_lists_verbs():
    done = subprocess.run([sys.executable, "-m", "defectscope.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for verb in ("train", "evaluate", "demo", "models"):
        assert verb in done.stdout
    probe = "import sys, defectscope.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"


def test_cli_errors_are_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "defectscope.cli", "train", "--data", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert done.returncode == 2
    assert "defectscope: error:" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_readme_wafer_and_audit_commands(tmp_path):
    """The wafer block as written except training: a small seed CNN for 2 epochs keeps the test short."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    commands = [line for block in _blocks("bash", "Wafer maps") for line in block.splitlines() if line.strip()]
    assert len(commands) == 4
    commands[1] = commands[1].replace("--epochs 5", "--epochs 2 --model seed_cnn2 --image-size 32 --no-progress")
    for command in commands:
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert '"top_class"' in done.stdout
    (audit_cmd,) = [line for block in _blocks("bash", "Data audit") for line in block.splitlines() if line.strip()]
    done = subprocess.run(audit_cmd.replace("my_images/", "wafer_maps/manifest.csv"), shell=True, cwd=tmp_path,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "audit" / "audit.html").is_file()
