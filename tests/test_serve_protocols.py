"""The connection guards on each HTTP parser the station can run (h11, httptools): the head bound, the header
deadline after an answer and behind a pipelined request, and what ``auto`` picks."""

from __future__ import annotations

import importlib.util
import socket
import time

import pytest
from test_serve import HTTP_IMPLEMENTATIONS, config_for, running

from defectscope.station.serve.config import ServeConfig
from defectscope.station.serve.connections import MAX_HEAD_BYTES, http_implementation, loop_implementation


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _head(pad: int) -> bytes:
    return b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * pad + b"\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("http", HTTP_IMPLEMENTATIONS)
def test_a_request_head_is_bounded(station_model, tmp_path, http):
    config = config_for(tmp_path, station_model, http=http)
    with running(config) as url:
        with _connect(url) as s:  # just under the bound: answered
            s.sendall(_head(MAX_HEAD_BYTES - 200))
            assert _read_all(s).startswith(b"HTTP/1.1 200")
        # Over it, in one piece: refused and closed by httptools. h11 bounds only what it buffers of a head not
        # yet whole (the next check); a whole head that arrived in one read it parses.
        for size in (MAX_HEAD_BYTES + 10, 4 * MAX_HEAD_BYTES) if http == "httptools" else ():
            with _connect(url) as s:
                s.sendall(_head(size))
                answer = _read_all(s)
                assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), answer[:80]
        with _connect(url) as s:  # one header growing without end, never finished: cut at the bound
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ")
            sent = 0
            with pytest.raises(OSError):
                for _ in range(64):
                    s.sendall(b"a" * 4096)
                    sent += 4096
                    time.sleep(0.01)
                s.sendall(b"a")  # pragma: no cover - reached only when nothing was refused
            assert sent <= 8 * MAX_HEAD_BYTES


@pytest.mark.parametrize("http", HTTP_IMPLEMENTATIONS)
def test_the_header_deadline_restarts_after_each_answer_and_spares_a_pipelined_request(station_model, tmp_path,
                                                                                       http):
    config = config_for(tmp_path, station_model, header_timeout=0.6, body_timeout=5.0, keep_alive=30.0, http=http)
    with running(config) as url:
        with _connect(url) as s:  # kept alive after an answer, then idle: closed at the header deadline
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answered = time.monotonic()
            answer = _read_all(s)
            assert answer.startswith(b"HTTP/1.1 200") and 0.4 < time.monotonic() - answered < 3
        # Two requests in one packet; the second one's body trickles in for longer than the header deadline.
        body = b'{"decision_id": 1, "label": "GOOD", "reviewer": "ann"}'
        second = (b"POST /v1/reviews HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        with _connect(url) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + second + body[:5])
            for i in range(5, len(body), 4):
                time.sleep(0.1)
                s.sendall(body[i:i + 4])
            answer = _read_all(s)
        assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1 ") == 2, answer[:300]
        assert b"HTTP/1.1 408" not in answer  # the body arrived within its own deadline


def test_auto_takes_the_c_parser_and_loop_when_installed(station_model, tmp_path):
    has_httptools = importlib.util.find_spec("httptools") is not None
    has_uvloop = importlib.util.find_spec("uvloop") is not None
    assert http_implementation("auto") == ("httptools" if has_httptools else "h11")
    assert loop_implementation("auto") == ("uvloop" if has_uvloop else "asyncio")
    assert http_implementation("h11") == "h11" and loop_implementation("asyncio") == "asyncio"
    with pytest.raises(ValueError, match="http must be one of"):
        ServeConfig(model=tmp_path / "m.onnx", http="h2")
    with pytest.raises(ValueError, match="loop must be one of"):
        ServeConfig(model=tmp_path / "m.onnx", loop="trio")
    if not has_httptools:
        with pytest.raises(ValueError, match="pip install httptools"):
            http_implementation("httptools")
