"""The GPU check's tooling on the CPU (issue #20 fix 2, #17 item 5): imports without PyAV/aiortc/webrtcvad,
no import cycle between benches, offline wheels, and scripts/gpu_check.sh's dry run within its budget."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKER = '''
import sys

class _Blocker:
    """Imports of these packages fail, as on a GPU machine that lacks them."""
    BLOCKED = ("av", "aiortc", "webrtcvad")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, _Blocker())
'''


def run_python(code: str, pythonpath: list[Path], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in pythonpath)}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_gpu_check_imports_without_av_aiortc_or_webrtcvad(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    blocked = run_python("import av", [tmp_path, ROOT])
    assert blocked.returncode != 0 and "blocked by the test" in blocked.stderr  # the blocker works
    done = run_python("import sys, bench.gpu_check, bench.common; "
                      "print(sorted(m for m in ('av', 'aiortc', 'webrtcvad') if m in sys.modules))",
                      [tmp_path, ROOT])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def bench_imports(path: Path) -> set[str]:
    """The bench modules a bench file imports, anywhere in it (function-level imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bench."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("bench.")}
    return out


def test_no_import_cycle_between_benches():
    graph = {p.stem: bench_imports(p) for p in (ROOT / "bench").glob("*.py")}
    assert "sessions" not in graph["gpu_check"] and "gpu_check" not in graph["sessions"]

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = [m for m in graph if reaches(m, m, {m})]
    assert cycles == []


def make_wheel(folder: Path, dist: str, module: str, body: str) -> Path:
    wheel = folder / f"{dist}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{module}/__init__.py", body)
        zf.writestr(f"{dist}-1.0.dist-info/METADATA", f"Name: {dist}\nVersion: 1.0\n")
    return wheel


def test_install_wheels_unpacks_only_what_is_missing(tmp_path):
    wheels, site = tmp_path / "whl", tmp_path / "site"
    wheels.mkdir()
    make_wheel(wheels, "zz_gpu_fake", "zz_gpu_fake", "from zz_gpu_dep import VALUE\n")
    make_wheel(wheels, "zz_gpu_dep", "zz_gpu_dep", "VALUE = 42\n")
    make_wheel(wheels, "json_shadow", "json_shadow", "")
    cmd = [sys.executable, "scripts/install_wheels.py", "--wheels", str(wheels), "--site", str(site),
           "--need", "zz_gpu_fake=zz_gpu_fake,zz_gpu_dep", "--need", "json=json_shadow",
           "--need", "zz_gpu_absent=zz_gpu_absent"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["missing"] == ["zz_gpu_fake", "zz_gpu_absent"]  # json is there: not touched
    assert sorted(report["unpacked"]) == ["zz_gpu_dep-1.0-py3-none-any.whl", "zz_gpu_fake-1.0-py3-none-any.whl"]
    assert report["unavailable"] == ["zz_gpu_absent"]
    assert not (site / "json_shadow").exists()
    done = run_python("import zz_gpu_fake; print(zz_gpu_fake.VALUE)", [site])
    assert done.returncode == 0 and done.stdout.strip() == "42", done.stderr


def test_the_fetched_wheels_cover_what_the_installer_needs():
    """Every distribution scripts/install_wheels.py may unpack is one scripts/fetch_gpu_wheels.sh fetches."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import install_wheels
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    specs = re.findall(r'^\s+"([A-Za-z0-9_.-]+)==', (ROOT / "scripts/fetch_gpu_wheels.sh").read_text(), re.M)
    fetched = {s.lower().replace("-", "_") for s in specs}
    needed = {d for dists in install_wheels.NEEDED.values() for d in dists}
    assert needed <= fetched, needed - fetched
    assert not fetched & {"torch", "numpy", "opencv_python", "opencv_python_headless", "aiohttp"}


def run_gpu_check_sh(tmp_path: Path, *args: str, timeout: float,
                     python: str = sys.executable) -> tuple[dict, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHON": python, "GPU_CHECK_WHEELS": str(tmp_path / "no-wheels")}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", *args, "--out", str(tmp_path / "out")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])  # the last line: one JSON object
    return result, proc


@pytest.mark.slow
def test_cpu_smoke_dry_run_within_60_s(tmp_path):
    """scripts/gpu_check.sh --cpu-smoke: every step of the GPU machine's command, on the CPU, < 60 s."""
    result, _ = run_gpu_check_sh(tmp_path, "--cpu-smoke", timeout=120)
    sh = result["gpu_check_sh"]
    assert sh["mode"] == "cpu-smoke" and sh["wall_s"] < 60 and sh["within_budget"]
    assert sh["cuda_tests"].get("skipped", 0) >= 8 and not sh["cuda_tests"].get("failed")
    assert sh["gpu_check_rc"] == 0 and sh["timed_out"] == [] and sh["ok"], sh
    check = result["gpu_check"]
    assert check["smoke"] is True and check["reference"] == "fp32 eager, TF32 off"
    assert check["accuracy"]["graphs"]["max_abs_diff"] <= 1  # fp32 on CPU: the official numerics
    assert (tmp_path / "out" / "result.json").exists()


@pytest.mark.slow
def test_the_wall_clock_budget_is_hard(tmp_path):
    """A step that overruns the budget (a GPU check that hangs, played by a Python that sleeps 60 s before
    bench/gpu_check.py) is cut, and the JSON line still comes, in time. (The smoke run itself fits in
    12 s on a quiet machine, so it cannot stand for the overrun.)"""
    hanging = tmp_path / "python-hanging-gpu-check"
    hanging.write_text(f'#!/bin/sh\ncase "$*" in *bench/gpu_check.py*) sleep 60 ;; esac\nexec {sys.executable} "$@"\n')
    hanging.chmod(0o755)
    result, _ = run_gpu_check_sh(tmp_path, "--cpu-smoke", "--budget-s", "12", timeout=60, python=str(hanging))
    sh = result["gpu_check_sh"]
    assert sh["budget_s"] == 12 and sh["wall_s"] <= 12 + 4  # timeout's kill grace at most
    assert "gpu_check" in sh["timed_out"] and not sh["ok"] and result["gpu_check"] is None
