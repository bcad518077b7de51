"""The browser harness's own plumbing (tests/browser.py), fast and without a browser or nerfstudio: what is
reported missing, CI fail-vs-skip, and that the viewer process group is started, awaited and killed."""

from __future__ import annotations

import os
import sys
import time

import pytest

import browser
from browser import ViewerServer, browser_missing_reason, free_port, require_browser


class _FakeServer(ViewerServer):
    """ViewerServer running a stand-in command instead of ns-viewer."""

    def __init__(self, config_path, code: str, **kw):
        super().__init__(config_path, **kw)
        self.code = code

    def command(self):
        return [sys.executable, "-c", self.code.replace("PORT", str(self.port))]


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text("not used by the fake servers\n")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); count it as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_missing_chromium_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv(browser.CHROMIUM_ENV, str(tmp_path / "no_such_chromium"))
    reason = browser_missing_reason()
    assert reason is not None and "Chromium" in reason and "no_such_chromium" in reason
    assert "install_system_deps.sh" in reason
    assert browser.find_chromium() is None


def test_chromium_env_override_is_used(monkeypatch, tmp_path):
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv(browser.CHROMIUM_ENV, str(fake))
    assert browser.find_chromium() == str(fake)


def test_require_browser_fails_under_ci_and_skips_otherwise(monkeypatch, tmp_path):
    monkeypatch.setenv(browser.CHROMIUM_ENV, str(tmp_path / "nothing"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set.*Chromium"):
        require_browser()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="Chromium"):
        require_browser()


def test_free_port_can_be_bound():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_viewer_server_rejects_missing_config(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ViewerServer(tmp_path / "nope" / "config.yml")


def test_viewer_server_command_is_ns_viewer(config_file):
    cmd = ViewerServer(config_file, port=7123).command()
    assert cmd[:3] == [sys.executable, "-m", "nerfstudio.scripts.viewer.run_viewer"]
    assert cmd[3:] == ["--load-config", str(config_file), "--viewer.websocket-port", "7123",
                       "--viewer.websocket-host", "127.0.0.1"]


def test_viewer_server_waits_for_http_and_kills_its_process_group(config_file, tmp_path):
    # the leader serves HTTP and leaves a grandchild behind; stop() must take both down
    code = (
        "import subprocess, sys, http.server, functools;"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']);"
        "print('CHILD', child.pid, flush=True);"
        "http.server.ThreadingHTTPServer(('127.0.0.1', PORT), http.server.SimpleHTTPRequestHandler).serve_forever()"
    )
    server = _FakeServer(config_file, code, log_path=tmp_path / "fake.log")
    with server:
        import urllib.request

        with urllib.request.urlopen(server.url, timeout=5) as resp:
            assert resp.status == 200
        leader = server.proc.pid
        for _ in range(50):
            text = server.log_path.read_text()
            if "CHILD" in text:
                break
            time.sleep(0.1)
        child = int(text.split("CHILD")[1].split()[0])
        assert _alive(leader) and _alive(child)
    assert server.proc is None
    for _ in range(50):
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(leader) and not _alive(child)
    server.stop()  # twice is fine


def test_viewer_server_reports_early_exit_with_log(config_file, tmp_path):
    server = _FakeServer(config_file, "import sys; print('boom: bad config'); sys.exit(3)", log_path=tmp_path / "x.log")
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 3.*boom: bad config"):
        server.start(timeout_s=60)
    server.stop()


def test_viewer_server_times_out_when_nothing_serves(config_file, tmp_path):
    server = _FakeServer(config_file, "import time; print('still importing'); time.sleep(120)", log_path=tmp_path / "y.log")
    try:
        with pytest.raises(TimeoutError, match="did not serve"):
            server.start(timeout_s=2)
        pid = server.proc.pid
    finally:
        server.stop()
    assert not _alive(pid)


def test_viewer_page_rejects_bad_viewport():
    with pytest.raises(ValueError, match="viewport"):
        browser.ViewerPage("http://127.0.0.1:1", viewport=(100, 50), chromium="/bin/true")
