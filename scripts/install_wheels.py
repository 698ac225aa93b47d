"""Make the modules the GPU check needs importable from wheels in a folder, offline (scripts/gpu_check.sh).

For each module this Python cannot import, the wheels that provide it (and what it needs) are unpacked
from the wheel folder (scripts/fetch_gpu_wheels.sh fills it) into a private folder that gpu_check.sh puts
on PYTHONPATH. Nothing is installed into the machine's Python: no pip, no network, no
externally-managed-environment refusal, and deleting the folder undoes it. Standard library only.

    python scripts/install_wheels.py --wheels .whl --site .whl/site-py3.12 [--need module=dist,dist ...]

Prints one JSON line: {"missing": [...], "unpacked": [wheel files], "unavailable": [dists without a wheel]}.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

# module -> the wheel distributions (file-name form) to unpack when it is missing: the package and
# what it needs beyond a GPU machine's Python (torch, numpy, OpenCV, aiohttp).
NEEDED: dict[str, list[str]] = {
    "av": ["av"],
    "webrtcvad": ["webrtcvad_wheels"],
    "pytest": ["pytest", "pluggy", "iniconfig", "packaging", "pygments"],
    "pytest_timeout": ["pytest_timeout"],
}


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def wheel_for(dist: str, folder: Path) -> Path | None:
    """The wheel of `dist` in folder (file names start with the distribution name and a dash)."""
    matches = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(dist.lower() + "-"))
    return matches[-1] if matches else None


def install(needed: dict[str, list[str]], wheels: Path, site: Path) -> dict[str, list[str]]:
    missing = [m for m in needed if not importable(m)]
    unpacked: list[str] = []
    unavailable: list[str] = []
    for module in missing:
        for dist in needed[module]:
            wheel = wheel_for(dist, wheels)
            if wheel is None:
                unavailable.append(dist)
                continue
            site.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(site)
            unpacked.append(wheel.name)
    return {"missing": missing, "unpacked": unpacked, "unavailable": unavailable}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheels", type=Path, required=True, help="folder of .whl files")
    parser.add_argument("--site", type=Path, required=True, help="where to unpack them (put it on PYTHONPATH)")
    parser.add_argument("--need", action="append", default=[], metavar="MODULE=DIST[,DIST]",
                        help="instead of the built-in list (tests)")
    args = parser.parse_args(argv)
    needed = NEEDED
    if args.need:
        needed = {m: d.split(",") for m, d in (spec.split("=", 1) for spec in args.need)}
    print(json.dumps(install(needed, args.wheels, args.site)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
