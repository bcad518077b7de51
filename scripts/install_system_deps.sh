#!/usr/bin/env bash
# Install the system packages the tests need, on Debian/Ubuntu-like systems (apt-get, as root or through sudo):
#   * Chromium (`chromium`) for the headless viewer tests, skipped when a `chromium` is already on PATH (or
#     $PEPESEG3D_CHROMIUM names a binary);
#   * COLMAP (`colmap`) for `ns-process-data images` in the own-photos test, `ffmpeg` for its image downscaling and
#     for ns-render, and `libusb-1.0-0`, which nerfstudio's open3d import needs;
#   * the `playwright` Python package (also in the `dev` extra), used with the system Chromium: no browser
#     download (`playwright install` is never run).
# Idempotent; a second run only checks. Ends with a headless WebGL smoke test.
# Environment: PYTHON (default: python3, else python), PEPESEG3D_CHROMIUM (use this browser binary).
set -euo pipefail

PYTHON="${PYTHON:-$(command -v python3 || command -v python || true)}"
if [ -z "$PYTHON" ]; then
  echo "install_system_deps.sh: no python3/python on PATH (set PYTHON=/path/to/python)" >&2
  exit 1
fi

chromium_bin="${PEPESEG3D_CHROMIUM:-}"
if [ -n "$chromium_bin" ] && [ ! -x "$chromium_bin" ]; then
  echo "install_system_deps.sh: PEPESEG3D_CHROMIUM=$chromium_bin is not an executable file" >&2
  exit 1
fi
if [ -z "$chromium_bin" ]; then
  chromium_bin="$(command -v chromium || command -v chromium-browser || true)"
fi

packages=()
if [ -n "$chromium_bin" ] && [ -x "$chromium_bin" ]; then
  echo "install_system_deps.sh: chromium present: $chromium_bin"
else
  packages+=(chromium)
fi
command -v colmap >/dev/null 2>&1 && echo "install_system_deps.sh: colmap present" || packages+=(colmap)
command -v ffmpeg >/dev/null 2>&1 && echo "install_system_deps.sh: ffmpeg present" || packages+=(ffmpeg)
if ldconfig -p 2>/dev/null | grep -q "libusb-1.0.so.0"; then
  echo "install_system_deps.sh: libusb-1.0 present"
else
  packages+=(libusb-1.0-0)
fi

if [ "${#packages[@]}" -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_system_deps.sh: missing ${packages[*]} and no apt-get here: install them with your package" \
         "manager (or set PEPESEG3D_CHROMIUM=/path/to/chromium)." >&2
    exit 1
  fi
  if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
  elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    echo "install_system_deps.sh: ${packages[*]} missing and installing them needs root: run this script as root," \
         "or install sudo, or run 'apt-get install -y ${packages[*]}' as an administrator." >&2
    exit 1
  fi
  echo "install_system_deps.sh: installing Debian's ${packages[*]} (apt-get) ..."
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}"
  chromium_bin="${chromium_bin:-$(command -v chromium)}"
  [ -x "$chromium_bin" ] || chromium_bin="$(command -v chromium)"
fi

if "$PYTHON" -c "import playwright.sync_api" >/dev/null 2>&1; then
  echo "install_system_deps.sh: playwright present ($("$PYTHON" -c "import importlib.metadata as m; print(m.version('playwright'))"))"
else
  echo "install_system_deps.sh: installing the playwright Python package (driver only; no browser download) ..."
  "$PYTHON" -m pip install -q "playwright>=1.45"
fi

# Smoke test: the system chromium starts headless under playwright and has WebGL (SwiftShader).
PEPESEG3D_CHROMIUM="$chromium_bin" "$PYTHON" - <<'EOF'
import os, sys
from playwright.sync_api import sync_playwright

args = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist",
        "--disable-dev-shm-usage"]
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=os.environ["PEPESEG3D_CHROMIUM"], headless=True, args=args)
    page = browser.new_page()
    gl = page.evaluate("() => { const c = document.createElement('canvas');"
                       " const g = c.getContext('webgl2') || c.getContext('webgl');"
                       " return g ? g.getParameter(g.VERSION) : null; }")
    version = browser.version
    browser.close()
if not gl:
    sys.exit("install_system_deps.sh: chromium starts but has no WebGL; the viewer (three.js) cannot draw")
print(f"install_system_deps.sh: ok: chromium {version}, {gl}")
EOF
