"""The CLI's error contract: a mistake the user can act on (any DefectscopeError, and the builtin errors that
mean bad input) is one line on stderr and exit code 2; a bug keeps its traceback; ``--debug`` shows the
traceback of anything, before or after the verb."""

from __future__ import annotations

import subprocess
import sys

import pytest

from defectscope.cli import main
from defectscope.evaluation.gradcam import GradCamError
from defectscope.station.sorter import SortError

SORT = ["sort", "model.onnx", "--inbox", "inbox", "--out", "out"]


def _raising(exc: BaseException):
    def verb(*args, **kwargs):
        raise exc

    return verb


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_a_sort_error_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr("defectscope.station.sorter.sort", _raising(SortError("out/x resolves outside out")))
    assert main(SORT) == 2
    assert _one_line(capsys.readouterr().err) == "defectscope: error: out/x resolves outside out"


def test_a_gradcam_error_is_one_line(monkeypatch, capsys):
    # A RuntimeError by its builtin base: recognised as the user's by DefectscopeError, not by its name.
    monkeypatch.setattr("defectscope.evaluation.evaluate.evaluate",
                        _raising(GradCamError("Backbone has no Conv2d layer for Grad-CAM")))
    assert main(["evaluate", "run"]) == 2
    assert _one_line(capsys.readouterr().err) == "defectscope: error: Backbone has no Conv2d layer for Grad-CAM"


def test_a_builtin_user_error_stays_one_line(monkeypatch, capsys):
    monkeypatch.setattr("defectscope.station.store.export_log", _raising(FileNotFoundError("db: no such file")))
    assert main(["log", "export", "db", "--out", "log.csv"]) == 2
    assert _one_line(capsys.readouterr().err) == "defectscope: error: db: no such file"


def test_a_bad_set_item_is_one_line(capsys):
    assert main(["train", "--data", "d", "--out", "o", "--set", "train.epochs"]) == 2
    assert "--set expects KEY=VALUE" in _one_line(capsys.readouterr().err)


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr("defectscope.station.sorter.sort", _raising(KeyError("internal")))
    with pytest.raises(KeyError):
        main(SORT)


@pytest.mark.parametrize("argv", [["--debug", *SORT], [*SORT, "--debug"]], ids=["before-verb", "after-verb"])
def test_debug_shows_the_traceback_of_a_user_error(monkeypatch, capsys, argv):
    monkeypatch.setattr("defectscope.station.sorter.sort", _raising(SortError("out/x resolves outside out")))
    assert main(argv) == 2  # the same exit code as without --debug
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "SortError" in err
    assert err.strip().splitlines()[-1] == "defectscope: error: out/x resolves outside out"


def test_python_dash_m_defectscope_runs_the_cli():
    for module in ("defectscope", "defectscope.cli"):
        done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.startswith("defectscope "), done.stderr


def test_serve_takes_its_stream_and_parser_options(monkeypatch, capsys):
    """--inference-streams, --http and --loop reach the service's config; a bad value is one line, no server."""
    import defectscope.station.serve as serve_pkg

    seen = {}
    monkeypatch.setattr(serve_pkg, "serve", lambda config: seen.setdefault("config", config))
    assert main(["serve", "model.onnx", "--inference-streams", "1", "--http", "h11", "--loop", "asyncio"]) == 0
    config = seen["config"]
    assert (config.inference_streams, config.http, config.loop) == (1, "h11", "asyncio")
    assert main(["serve", "model.onnx", "--inference-streams", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "inference_streams must be >= 1" in err and "\n" not in err
