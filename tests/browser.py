"""Headless-browser harness for nerfstudio's viewer, for tests.

Two pieces, used together through :func:`open_viewer`:

* :class:`ViewerServer` runs ``ns-viewer --load-config RUN/config.yml`` (the module behind the ``ns-viewer``
  script, started with this interpreter) in its own process group on a free local port, waits until it serves
  HTTP, and kills the whole group on exit.
* :class:`ViewerPage` opens that URL in Debian's system Chromium, headless, driven by Playwright's Python package
  (``executable_path`` points at the system binary: nothing is downloaded). WebGL comes from SwiftShader.
  It knows the DOM of viser 0.2.7's client (nerfstudio 1.1.5 pins it): GUI rows are
  ``<label for=ID>Label</label>`` next to the input ``#ID``; the 3D view is ``canvas[data-engine^="three.js"]``;
  the render the server sends is drawn as that canvas' background; nerfstudio's stats markdown says
  ``Resolution: WxHpx`` once a frame has been sent.

Coordinates: canvas pixels are CSS pixels of the 3D canvas, origin top-left, x right, y down (what viser
reports back as ``screen_pos`` after normalising by the canvas size, OpenCV convention). Images are
``np.uint8`` arrays ``[H, W, 3]`` (RGB).

Everything is torn down on failure: :func:`open_viewer` is a context manager that closes the browser and kills
the viewer's process group whatever happens inside, and prints the viewer's log tail when the body raises.

Missing pieces (no Chromium, no ``playwright``) are reported by :func:`browser_missing_reason`;
:func:`require_browser` turns that into a pytest failure when ``CI`` is set and a skip otherwise.
``bash scripts/install_system_deps.sh`` installs both.

:func:`attach_click_probe` (used with ``ViewerServer(click_probe=True)``) adds test-only GUI to the loaded model:
a "Listen for click" button that registers a viewer click callback, and a "Last click" text field the callback
fills, so a test can check from the browser that a canvas click reached the server.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent

CHROMIUM_ENV = "PEPESEG3D_CHROMIUM"
"""Environment variable: path of the Chromium/Chrome binary to use instead of ``chromium`` on ``PATH``."""

CHROMIUM_ARGS: Tuple[str, ...] = (
    "--no-sandbox",  # we run as root in containers; Playwright adds it too, stated here for other drivers
    "--use-angle=swiftshader",  # software WebGL: there is no GPU on CI
    "--enable-unsafe-swiftshader",  # recent Chromium only falls back to SwiftShader WebGL with this flag
    "--ignore-gpu-blocklist",
    "--disable-dev-shm-usage",  # small /dev/shm in containers
)

INSTALL_HINT = "run `bash scripts/install_system_deps.sh` (Debian's chromium + the playwright pip package)"

_THREE_CANVAS = 'canvas[data-engine^="three.js"]'
_RESOLUTION_RE = re.compile(r"Resolution:\s*(\d+)x(\d+)px")


# ----------------------------------------------------------------------------------------------- availability


def find_chromium() -> Optional[str]:
    """Path of the Chromium binary to drive: ``$PEPESEG3D_CHROMIUM`` if set, else ``chromium`` (Debian's
    package) or ``chromium-browser`` on ``PATH``; ``None`` when there is none."""
    env = os.environ.get(CHROMIUM_ENV)
    if env:
        return env if Path(env).is_file() and os.access(env, os.X_OK) else None
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def browser_missing_reason() -> Optional[str]:
    """``None`` when the browser tests can run (a Chromium binary and the ``playwright`` package), else one
    sentence naming what is missing and how to install it."""
    missing = []
    if find_chromium() is None:
        where = f"${CHROMIUM_ENV}={os.environ[CHROMIUM_ENV]!r} is not an executable" if os.environ.get(CHROMIUM_ENV) else "no `chromium` on PATH"
        missing.append(f"Chromium ({where})")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the `playwright` Python package")
    if not missing:
        return None
    return f"browser test needs {' and '.join(missing)}: {INSTALL_HINT}"


def require_browser() -> None:
    """In a test: fail (``CI`` set) or skip (otherwise) with :func:`browser_missing_reason` when the browser
    pieces are missing; return quietly when they are present."""
    import pytest

    reason = browser_missing_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and the {reason}", pytrace=False)
    pytest.skip(reason)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it; a tiny race with other processes remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------------------------- viewer process


class ViewerServer:
    """``ns-viewer --load-config CONFIG --viewer.websocket-port PORT --viewer.websocket-host HOST`` in a subprocess.

    Started with ``sys.executable -m nerfstudio.scripts.viewer.run_viewer`` (what the ``ns-viewer`` script runs)
    in a new session, so :meth:`stop` can kill the process group. ``PYTHONPATH`` gets the repository root
    prepended so the ``pepe-*`` method classes named in ``config.yml`` import even when the editable install
    points elsewhere. stdout/stderr go to ``log_path`` (a temp file when not given).

    Args:
        config_path: a run's ``config.yml``.
        port: websocket/HTTP port; a free one when ``None``.
        host: interface to bind (``127.0.0.1``: not exposed to the network).
        log_path: where the viewer's output goes.
        env: extra environment variables for the viewer (e.g. ``{"CUDA_VISIBLE_DEVICES": ""}``).
        click_probe: run the viewer with :func:`attach_click_probe` applied to the loaded model.
        extra_args: more ``ns-viewer`` arguments.
    """

    def __init__(
        self,
        config_path: Path,
        port: Optional[int] = None,
        host: str = "127.0.0.1",
        log_path: Optional[Path] = None,
        env: Optional[Dict[str, str]] = None,
        click_probe: bool = False,
        extra_args: Sequence[str] = (),
    ):
        config_path = Path(config_path)
        if not config_path.is_file():
            raise ValueError(f"ViewerServer: config file {config_path} does not exist (expected a run's config.yml)")
        self.config_path = config_path
        self.host = host
        self.port = int(port) if port is not None else free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.log_path = Path(log_path) if log_path is not None else Path(
            os.environ.get("TMPDIR", "/tmp")
        ) / f"pepeseg3d_viewer_{os.getpid()}_{self.port}.log"
        self.env = dict(env or {})
        self.click_probe = click_probe
        self.extra_args = list(extra_args)
        self.proc: Optional[subprocess.Popen] = None
        self._log_file: Optional[io.BufferedWriter] = None

    def command(self) -> List[str]:
        """The command line that :meth:`start` runs."""
        args = [
            "--load-config", str(self.config_path),
            "--viewer.websocket-port", str(self.port),
            "--viewer.websocket-host", self.host,
            *self.extra_args,
        ]
        if self.click_probe:
            code = f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import browser; browser._run_viewer_with_click_probe()"
            return [sys.executable, "-c", code, *args]
        return [sys.executable, "-m", "nerfstudio.scripts.viewer.run_viewer", *args]

    def start(self, timeout_s: float = 240.0) -> "ViewerServer":
        """Start the viewer and wait (polling every 0.5 s, up to ``timeout_s``) until ``GET /`` answers 200.

        Raises:
            RuntimeError: the viewer exited early (the message holds its log tail).
            TimeoutError: it did not serve within ``timeout_s``.
        """
        if self.proc is not None:
            raise RuntimeError("ViewerServer.start called twice")
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.command(), stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=str(REPO_ROOT), start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"ns-viewer exited with code {code} before serving {self.url}; log tail:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"ns-viewer did not serve {self.url} within {timeout_s:.0f} s; log tail:\n{self.log_tail()}")

    def log_tail(self, n_chars: int = 4000) -> str:
        """The last ``n_chars`` characters of the viewer's output."""
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 5.0) -> None:
        """Kill the viewer's process group: SIGTERM, wait up to ``grace_s``, then SIGKILL whatever is left of the
        group (children included). Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is not None:
            pgid = proc.pid  # == the group id: started with start_new_session
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "ViewerServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------- browser page


def _png_to_array(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


class ViewerPage:
    """A headless Chromium page showing the viewer at ``url`` (Playwright, system Chromium).

    Args:
        url: the viewer's address (``ViewerServer.url``).
        viewport: browser window size ``(width, height)`` in CSS pixels.
        chromium: binary to drive (default :func:`find_chromium`).
        timeout_s: default limit for each wait below.
    """

    def __init__(self, url: str, viewport: Tuple[int, int] = (1200, 800), chromium: Optional[str] = None,
                 timeout_s: float = 90.0):
        if len(viewport) != 2 or min(viewport) < 200:
            raise ValueError(f"ViewerPage: viewport must be (width, height) >= 200 px, got {viewport}")
        self.url = url
        self.viewport = (int(viewport[0]), int(viewport[1]))
        self.chromium = chromium or find_chromium()
        if self.chromium is None:
            raise RuntimeError(f"no Chromium found: {INSTALL_HINT}")
        self.timeout_s = timeout_s
        self.console: List[str] = []
        """Browser console messages, ``"type: text"``, in arrival order."""
        self._pw = None
        self._browser = None
        self.page = None

    # -- life cycle

    def open(self, wait_for_label: str = "Output type") -> "ViewerPage":
        """Launch Chromium, load the viewer and wait until the GUI row ``wait_for_label`` exists (the websocket is
        connected and nerfstudio's control panel has arrived)."""
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(
                executable_path=self.chromium, headless=True, args=list(CHROMIUM_ARGS)
            )
            self.page = self._browser.new_page(viewport={"width": self.viewport[0], "height": self.viewport[1]})
            self.page.set_default_timeout(self.timeout_s * 1000)
            self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
            self.page.goto(self.url, wait_until="domcontentloaded")
            self._label(wait_for_label).wait_for(state="visible")
            self.page.locator(_THREE_CANVAS).wait_for(state="visible")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Close the browser and stop Playwright's driver. Safe to call twice."""
        browser, pw = self._browser, self._pw
        self._browser = self._pw = self.page = None
        if browser is not None:
            with contextlib.suppress(Exception):
                browser.close()
        if pw is not None:
            with contextlib.suppress(Exception):
                pw.stop()

    def __enter__(self) -> "ViewerPage":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- GUI rows

    def _label(self, label: str, nth: int = 0):
        loc = self.page.locator("label").filter(has_text=re.compile(rf"^\s*{re.escape(label)}\s*$"))
        return loc.nth(nth)

    def _row(self, label: str, nth: int = 0):
        """The GUI row (label + control) whose label text is exactly ``label`` (``nth`` match)."""
        label_loc = self._label(label, nth)
        try:
            label_loc.wait_for(state="visible")
        except Exception as err:
            raise ValueError(f"no GUI element labelled {label!r} (match {nth}) in the viewer: {self.gui_labels()}") from err
        return label_loc.locator("xpath=ancestor::div[contains(@class, 'mantine-Flex-root')][1]")

    def gui_labels(self) -> List[str]:
        """Texts of every labelled GUI row currently shown (``[str]``, page order)."""
        return [t.strip() for t in self.page.locator("label").all_inner_texts()]

    def _input_for(self, label: str, nth: int = 0):
        """The ``<input>`` of the row labelled ``label``: the element the label points at when that is an input
        (dropdowns), else the row's first visible input (text and number fields get their own Mantine ids)."""
        row = self._row(label, nth)  # waits, and names the label in the error
        target = self.page.locator(f'input[id="{self._label(label, nth).get_attribute("for")}"]')
        if target.count() == 1:
            return target
        return row.locator("input:not([type=hidden])").first

    def dropdown_value(self, label: str, nth: int = 0) -> str:
        """Current value of the dropdown labelled ``label`` (e.g. ``"Output type"`` -> ``"rgb"``)."""
        return self._input_for(label, nth).input_value()

    def _open_dropdown(self, label: str, nth: int = 0):
        box = self._input_for(label, nth)
        if box.is_disabled():
            raise ValueError(f"dropdown {label!r} is disabled (nerfstudio disables 'Colormap' for rgb outputs)")
        box.click()
        return box

    def dropdown_options(self, label: str, nth: int = 0) -> List[str]:
        """Options of the dropdown labelled ``label`` (opens it, reads the list, closes it with Escape)."""
        box = self._open_dropdown(label, nth)
        listbox = self.page.locator(f'[id="{box.get_attribute("aria-controls")}"]')
        listbox.get_by_role("option").first.wait_for(state="visible")
        options = [t.strip() for t in listbox.get_by_role("option").all_inner_texts()]
        box.press("Escape")
        return options

    def select_dropdown(self, label: str, value: str, nth: int = 0) -> None:
        """Pick ``value`` in the dropdown labelled ``label`` the way a user does (open it, click the option) and
        wait until the input shows it.

        Raises:
            ValueError: no such dropdown, or ``value`` is not one of its options (the options are listed).
        """
        box = self._open_dropdown(label, nth)
        listbox = self.page.locator(f'[id="{box.get_attribute("aria-controls")}"]')
        listbox.get_by_role("option").first.wait_for(state="visible")
        option = listbox.get_by_role("option", name=value, exact=True)
        if option.count() == 0:
            options = [t.strip() for t in listbox.get_by_role("option").all_inner_texts()]
            box.press("Escape")
            raise ValueError(f"dropdown {label!r} has no option {value!r}; options: {options}")
        option.click()
        self._poll(lambda: box.input_value() == value, f"dropdown {label!r} to show {value!r}")

    def get_slider(self, label: str, nth: int = 0) -> float:
        """Current value of the slider labelled ``label`` (its ``aria-valuenow``)."""
        thumb = self._row(label, nth).get_by_role("slider")
        return float(thumb.get_attribute("aria-valuenow"))

    def set_slider(self, label: str, value: float, nth: int = 0) -> None:
        """Type ``value`` into the number box beside the slider labelled ``label`` (one input event: the server
        gets one update) and wait until the slider shows it."""
        row = self._row(label, nth)
        box = row.locator("input.mantine-NumberInput-input")
        box.fill(f"{value:g}")
        box.press("Enter")
        self._poll(lambda: abs(self.get_slider(label, nth) - float(value)) < 1e-6, f"slider {label!r} to reach {value:g}")

    def get_text(self, label: str, nth: int = 0) -> str:
        """Value of the text/number field labelled ``label``."""
        return self._input_for(label, nth).input_value()

    def press_button(self, label: str, nth: int = 0) -> None:
        """Click the GUI button whose text is exactly ``label``.

        Raises:
            ValueError: no visible button with that text.
        """
        button = self.page.get_by_role("button", name=label, exact=True).nth(nth)
        try:
            button.wait_for(state="visible")
        except Exception as err:
            names = [t.strip() for t in self.page.get_by_role("button").all_inner_texts() if t.strip()]
            raise ValueError(f"no button {label!r} in the viewer; buttons: {names}") from err
        button.click()

    def wait_for_text(self, pattern: str, timeout_s: Optional[float] = None) -> str:
        """Wait until some element's text matches the regex ``pattern``; return the first match's text."""
        loc = self.page.get_by_text(re.compile(pattern)).first
        loc.wait_for(state="visible", timeout=(timeout_s or self.timeout_s) * 1000)
        return loc.inner_text()

    # -- 3D canvas

    def canvas_box(self) -> Tuple[float, float, float, float]:
        """``(left, top, width, height)`` of the 3D canvas in page CSS pixels."""
        box = self.page.locator(_THREE_CANVAS).bounding_box()
        if box is None:
            raise RuntimeError("the viewer's 3D canvas is not on the page")
        return box["x"], box["y"], box["width"], box["height"]

    def click_canvas(self, x: float, y: float) -> None:
        """Left-click the 3D canvas at canvas pixel ``(x, y)`` (CSS px from its top-left corner). viser turns this
        into a scene click (ray + ``screen_pos = ((x + 0.5) / width, (y + 0.5) / height)``) only while the server
        has a pointer callback registered.

        Raises:
            ValueError: ``(x, y)`` is outside the canvas.
        """
        left, top, w, h = self.canvas_box()
        if not (0 <= x < w and 0 <= y < h):
            raise ValueError(f"click_canvas: ({x}, {y}) is outside the {w:.0f}x{h:.0f} canvas")
        self.page.mouse.click(left + x, top + y)

    def drag_canvas(self, start: Tuple[float, float], end: Tuple[float, float], steps: int = 8) -> None:
        """Press at canvas pixel ``start``, move to ``end`` in ``steps`` moves, release (orbit the camera, or a
        rectangle selection when the server listens for ``rect-select``)."""
        left, top, w, h = self.canvas_box()
        for x, y in (start, end):
            if not (0 <= x < w and 0 <= y < h):
                raise ValueError(f"drag_canvas: ({x}, {y}) is outside the {w:.0f}x{h:.0f} canvas")
        self.page.mouse.move(left + start[0], top + start[1])
        self.page.mouse.down()
        self.page.mouse.move(left + end[0], top + end[1], steps=steps)
        self.page.mouse.up()

    def render_resolution(self) -> Optional[Tuple[int, int]]:
        """``(width, height)`` of the last frame the server sent, from nerfstudio's stats markdown; ``None``
        before the first frame (it says ``0x0px``)."""
        texts = self.page.get_by_text(_RESOLUTION_RE).all_inner_texts()
        for text in texts:
            m = _RESOLUTION_RE.search(text)
            if m and int(m.group(1)) > 0 and int(m.group(2)) > 0:
                return int(m.group(1)), int(m.group(2))
        return None

    def viewport_image(self) -> np.ndarray:
        """Screenshot of the 3D canvas as ``np.uint8 [H, W, 3]`` (CSS pixel size)."""
        return _png_to_array(self.page.locator(_THREE_CANVAS).screenshot())

    def wait_for_render(self, full_resolution: bool = True, min_std: float = 3.0, stable_diff: float = 2.0,
                        timeout_s: Optional[float] = None) -> np.ndarray:
        """Wait until the viewport shows a rendered frame and return it (``np.uint8 [H, W, 3]``).

        Conditions, polled every 0.5 s: the server has sent a frame (stats markdown resolution > 0); with
        ``full_resolution``, its longer side equals the "Max res" slider (the viewer's static high-resolution
        render, not the low-resolution one it sends while moving); the canvas is not uniform (pixel std >
        ``min_std``); and two consecutive captures 0.5 s apart differ by a mean absolute value < ``stable_diff``
        (the frame has been drawn and nothing is still changing).

        Raises:
            TimeoutError: with the last state seen.
        """
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        prev = None
        state = "no frame yet"
        while time.monotonic() < deadline:
            res = self.render_resolution()
            if res is None:
                state = "the server has not sent a frame (Resolution: 0x0px)"
            elif full_resolution and max(res) < int(self.get_slider("Max res")):
                state = f"only a low-resolution frame ({res[0]}x{res[1]}) so far"
                prev = None
            else:
                img = self.viewport_image()
                std = float(img.std())
                if std <= min_std:
                    state = f"viewport uniform (std {std:.2f})"
                    prev = None
                elif prev is not None and prev.shape == img.shape and np.abs(prev.astype(np.int16) - img).mean() < stable_diff:
                    return img
                else:
                    state = "viewport still changing"
                    prev = img
            time.sleep(0.5)
        raise TimeoutError(f"wait_for_render: {state} after {timeout_s or self.timeout_s:.0f} s")

    def wait_for_change(self, reference: np.ndarray, min_diff: float = 8.0, timeout_s: Optional[float] = None) -> np.ndarray:
        """Wait until the viewport differs from ``reference`` (``[H, W, 3]`` uint8) by a mean absolute value >=
        ``min_diff``, then until it is a settled full-resolution render (:meth:`wait_for_render`); return it."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        diff = 0.0
        while time.monotonic() < deadline:
            img = self.viewport_image()
            if img.shape == reference.shape:
                diff = float(np.abs(img.astype(np.int16) - reference).mean())
                if diff >= min_diff:
                    return self.wait_for_render(timeout_s=max(1.0, deadline - time.monotonic()))
            time.sleep(0.5)
        raise TimeoutError(f"wait_for_change: viewport still within {diff:.2f} < {min_diff} of the reference")

    def screenshot(self, path: Optional[Path] = None, region: str = "page") -> np.ndarray:
        """Screenshot of the whole page (``region="page"``) or of the 3D canvas (``"viewport"``), saved as PNG to
        ``path`` when given; returns it as ``np.uint8 [H, W, 3]``."""
        if region == "page":
            png = self.page.screenshot()
        elif region == "viewport":
            png = self.page.locator(_THREE_CANVAS).screenshot()
        else:
            raise ValueError(f"screenshot: region must be 'page' or 'viewport', got {region!r}")
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(png)
        return _png_to_array(png)

    def _poll(self, condition, what: str, timeout_s: Optional[float] = None, every_s: float = 0.2) -> None:
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(every_s)
        raise TimeoutError(f"timed out waiting for {what}")


@contextlib.contextmanager
def open_viewer(config_path: Path, log_path: Optional[Path] = None, env: Optional[Dict[str, str]] = None,
                viewport: Tuple[int, int] = (1200, 800), click_probe: bool = False,
                start_timeout_s: float = 240.0, timeout_s: float = 90.0) -> Iterator[Tuple[ViewerServer, ViewerPage]]:
    """Start :class:`ViewerServer` on ``config_path``, open it in a :class:`ViewerPage`, yield both; on the way
    out close the browser and kill the viewer's process group, also when the body raises (then the viewer's
    log tail and the browser console are printed, so pytest shows them)."""
    server = ViewerServer(config_path, log_path=log_path, env=env, click_probe=click_probe)
    with serve_and_open(server, viewport, start_timeout_s, timeout_s) as opened:
        yield opened


@contextlib.contextmanager
def serve_and_open(server: "ViewerServer", viewport: Tuple[int, int] = (1200, 800), start_timeout_s: float = 240.0,
                   timeout_s: float = 90.0) -> Iterator[Tuple["ViewerServer", "ViewerPage"]]:
    """Start ``server`` (a :class:`ViewerServer` or subclass), open it in a :class:`ViewerPage`, yield both; tear
    both down on the way out and print the viewer's log tail and the browser console when the body raises."""
    page: Optional[ViewerPage] = None
    try:
        server.start(timeout_s=start_timeout_s)
        page = ViewerPage(server.url, viewport=viewport, timeout_s=timeout_s).open()
        yield server, page
    except BaseException:
        print(f"--- ns-viewer log tail ({server.log_path}):\n{server.log_tail()}")
        if page is not None:
            print("--- browser console (last 30):\n" + "\n".join(page.console[-30:]))
        raise
    finally:
        if page is not None:
            page.close()
        server.stop()


# ----------------------------------------------------------------------------------------------- click probe


def attach_click_probe(model: Any) -> None:
    """Give ``model`` (a loaded nerfstudio model) test-only viewer GUI, the way a method declares its own:

    * ``click_probe_control``: a ``ViewerControl``;
    * ``click_probe_listen``: a button "Listen for click" that registers a ``"click"`` pointer callback;
    * ``click_probe_last``: a disabled text field "Last click" that the callback fills with a JSON object:
      ``screen_pos`` (``[x, y]`` in [0, 1], OpenCV: x right, y down, of the canvas), ``origin`` and ``direction``
      (the click ray in nerfstudio world coordinates), and ``pixel_from_ray``: the ray projected into the
      viewer camera ``get_camera(H=100, W=round(100 * aspect))`` as ``[u, v]`` pixels, next to
      ``pixel_from_screen_pos = screen_pos * [W, H]`` (the two agree).

    Attributes must be set before the viewer is built: nerfstudio finds GUI elements by walking the pipeline's
    public attributes (recursing into ``nn.Module`` children) when ``Viewer`` is constructed.
    """
    import torch
    from nerfstudio.viewer.viewer_elements import ViewerButton, ViewerClick, ViewerControl, ViewerText

    control = ViewerControl()
    last = ViewerText("Last click", "none", disabled=True, hint="set by the test click callback")

    def on_click(click: ViewerClick) -> None:
        camera = control.get_camera(100, None)  # width = 100 * aspect of the browser canvas
        assert camera is not None
        w, h = float(camera.width.item()), float(camera.height.item())
        c2w = camera.camera_to_worlds[0]  # [3, 4], OpenGL camera axes: x right, y up, z backwards
        d_cam = c2w[:, :3].T @ torch.tensor(click.direction, dtype=c2w.dtype)  # world -> camera (rotation only)
        fx, fy = float(camera.fx.item()), float(camera.fy.item())
        cx, cy = float(camera.cx.item()), float(camera.cy.item())
        u = cx + fx * float(d_cam[0]) / float(-d_cam[2])  # OpenGL -> OpenCV: flip y and z
        v = cy - fy * float(d_cam[1]) / float(-d_cam[2])
        last.value = json.dumps({
            "screen_pos": [float(c) for c in click.screen_pos],
            "origin": [float(c) for c in click.origin],
            "direction": [float(c) for c in click.direction],
            "image_size": [w, h],
            "pixel_from_ray": [u, v],
            "pixel_from_screen_pos": [click.screen_pos[0] * w, click.screen_pos[1] * h],
        })

    def listen(_: ViewerButton) -> None:
        control.register_pointer_cb("click", on_click)

    model.click_probe_control = control
    model.click_probe_listen = ViewerButton("Listen for click", cb_hook=listen)
    model.click_probe_last = last


def _run_viewer_with_click_probe() -> None:
    """``ns-viewer`` with :func:`attach_click_probe` applied to the loaded model before the viewer is built
    (entry point of ``ViewerServer(click_probe=True)``; arguments as ``ns-viewer``'s, from ``sys.argv``)."""
    from nerfstudio.scripts.viewer import run_viewer

    start = run_viewer._start_viewer

    def start_with_probe(config, pipeline, step):
        attach_click_probe(pipeline.model)
        return start(config, pipeline, step)

    run_viewer._start_viewer = start_with_probe
    run_viewer.entrypoint()


# ----------------------------------------------------------------------------------------------- command line


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python tests/browser.py --load-config RUN/config.yml --output shot.png [--output-type depth]``: start the
    viewer on a run, wait for a full-resolution frame of the chosen output, save a screenshot of the page (how
    ``docs/images/viewer_pepe_recon.png`` was made)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--load-config", type=Path, required=True, help="a run's config.yml")
    parser.add_argument("--output", type=Path, required=True, help="PNG to write")
    parser.add_argument("--output-type", default="rgb", help="value for the viewer's 'Output type' dropdown")
    parser.add_argument("--max-res", type=int, default=None, help="set the viewer's 'Max res' slider")
    parser.add_argument("--hide-train-cams", action="store_true", help="press 'Hide Train Cams' first")
    parser.add_argument("--viewport", default="1200x800", help="browser window WIDTHxHEIGHT")
    args = parser.parse_args(argv)
    reason = browser_missing_reason()
    if reason:
        parser.exit(1, f"{reason}\n")
    width, height = (int(v) for v in args.viewport.lower().split("x"))
    with open_viewer(args.load_config, viewport=(width, height)) as (_, page):
        if args.max_res is not None:
            page.set_slider("Max res", args.max_res)
        if args.hide_train_cams:
            page.press_button("Hide Train Cams")
            page.wait_for_text(r"^Show Train Cams$")
        first = page.wait_for_render()
        if args.output_type != page.dropdown_value("Output type"):
            page.select_dropdown("Output type", args.output_type)
            page.wait_for_change(first)
        page.screenshot(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
