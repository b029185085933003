"""Render a study's runs/report.html in headless Chromium and save a PNG of it.

    python bench/screenshot_report.py [--state agent_state.json] [--runs-dir runs]
        [--out bench/results/report.png] [--width 1400] [--height 4000]

Writes the report from the state file first (as `python -m nas_agent_graph report` does), then
asks Chromium (the Debian package `chromium`; apt-get install chromium) for a full-page
screenshot of the file, offline: the report has no external resource to fetch. Prints the PNG's
path, size and pixel dimensions, so a run of it is evidence that the page renders.
"""
from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from nas_agent.agent_state import load_agent_state  # noqa: E402
from nas_agent_graph.report import write_report  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header; raises if the file is not a PNG."""
    head = path.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    return struct.unpack(">II", head[16:24])


def screenshot(page: Path, out: Path, width: int, height: int) -> None:
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        sys.exit("no Chromium found: apt-get install chromium (or put chromium on PATH)")
    with tempfile.TemporaryDirectory() as profile:  # a throwaway profile: no state left behind
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={out.resolve()}", page.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0 or not out.exists():
        sys.exit(f"chromium failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state", type=Path, default=Path("agent_state.json"))
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--out", type=Path, default=Path("bench/results/report.png"))
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=4000)
    args = p.parse_args()
    page = write_report(load_agent_state(args.state), args.runs_dir, state_path=args.state)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    screenshot(page, args.out, args.width, args.height)
    width, height = png_size(args.out)
    print(f"{page} -> {args.out}: {args.out.stat().st_size:,} bytes, {width}x{height} px")


if __name__ == "__main__":
    main()
