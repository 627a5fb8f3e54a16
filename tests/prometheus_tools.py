"""Find `prometheus` / `promtool` for the tests, fetching Debian's package when missing.

Policy: use the binaries on PATH (e.g. after `apt-get install prometheus`). Failing that, on a
Debian-family machine, `apt-get download prometheus` and unpack it with `dpkg-deb -x` into
~/.cache/hetero-orchestrator/prometheus: no root needed, nothing installed system-wide and no
service started (installing the package would start a Prometheus on :9090 wherever systemd
runs). Set ORCHESTRATOR_NO_DOWNLOAD=1 to forbid the download. When neither works, the caller
skips with the reason this module returns.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CACHE = Path.home() / ".cache" / "hetero-orchestrator" / "prometheus"
INSTALL_HINT = "install Debian's prometheus package (apt-get install -y prometheus)"


def tool(name: str) -> tuple[str | None, str]:
    """(path to `name`, "") or (None, why it is missing)."""
    found = shutil.which(name)
    if found:
        return found, ""
    unpacked = CACHE / "usr" / "bin" / name
    if unpacked.exists():
        return str(unpacked), ""
    why = _download()
    if unpacked.exists():
        return str(unpacked), ""
    return None, f"{name} not found and {why}; {INSTALL_HINT}"


@functools.lru_cache(maxsize=1)  # one attempt per test session
def tool_or_skip(name: str) -> str:
    """The tool's path, or skip the calling test saying why it is unavailable."""
    import pytest

    path, why = tool(name)
    if path is None:
        pytest.skip(why)
    return path


def _download() -> str:
    """Unpack Debian's prometheus package into CACHE; returns why it failed ("" if it did not)."""
    if os.environ.get("ORCHESTRATOR_NO_DOWNLOAD"):
        return "ORCHESTRATOR_NO_DOWNLOAD is set"
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return "this is not a Debian-family machine (no apt-get/dpkg-deb)"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", "prometheus"], cwd=tmp, check=True,
                           capture_output=True, text=True, timeout=300)
            deb = next(Path(tmp).glob("prometheus_*.deb"))
            CACHE.mkdir(parents=True, exist_ok=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(CACHE)], check=True,
                           capture_output=True, text=True, timeout=120)
        except subprocess.CalledProcessError as e:
            return f"`{' '.join(e.cmd)}` failed: {(e.stderr or e.stdout).strip()[-300:]}"
        except (subprocess.TimeoutExpired, StopIteration, OSError) as e:
            return f"downloading Debian's prometheus package failed: {type(e).__name__}: {e}"
    return ""
