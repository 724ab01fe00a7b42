"""Check that the dependency floors declared in pyproject.toml are true: install exactly them and run a smoke subset.

Builds a scratch virtual environment, installs every runtime dependency of ``pyproject.toml``
at its declared minimum (``name>=X`` -> ``name==X``, binary wheels only) plus ``pytest``, and runs a
smoke subset of the tests against the source tree (``PYTHONPATH``, qdetr itself is not installed).
Prints the versions it installed and the pytest summary; exits non-zero when a floor cannot be
installed (the message names it) or a smoke test fails.

Not part of ``make test`` (it downloads and installs packages): run ``make check-floors``.

Usage::

    python tools/check_floors.py [--venv DIR] [--keep] [--pytest-args ...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Fast tests that touch every runtime dependency: torch/torchvision (models, quantization,
#: preprocessing), safetensors (packed files), pycocotools + pillow (COCO), numpy, scipy (matcher),
#: pyyaml (configs), huggingface_hub (zoo), the safe loader (torch.serialization) and the error paths.
SMOKE_TESTS = [
    "tests/robustness/test_untrusted_files.py",
    "tests/robustness/test_inputs.py",
    "tests/zoo/test_zoo_safe_load.py",
    "tests/zoo/test_zoo_packed_state.py",
    "tests/models/test_matcher.py",
    "tests/quant/test_quantize_model.py",
    "tests/data/test_data_coco.py",
]
_FLOOR_RE = re.compile(r"^\s*([A-Za-z0-9_.\-\[\]]+)\s*>=\s*([0-9][0-9A-Za-z.+\-]*)\s*(?:,.*)?$")


def declared_floors(pyproject: Path = ROOT / "pyproject.toml") -> list[tuple[str, str]]:
    """``[(name, minimum)]`` of ``[project].dependencies``; every dependency must declare a floor."""
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    floors = []
    for requirement in dependencies:
        match = _FLOOR_RE.match(requirement)
        if match is None:
            raise SystemExit(f"{pyproject}: dependency {requirement!r} has no '>=' floor")
        floors.append((match.group(1), match.group(2)))
    return floors


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, text=True, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", help="where to build the environment (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the environment afterwards")
    parser.add_argument("--pytest-args", nargs=argparse.REMAINDER, default=[], help="extra pytest arguments")
    args = parser.parse_args(argv)

    floors = declared_floors()
    venv = Path(args.venv) if args.venv else Path(tempfile.mkdtemp(prefix="qdetr-floors-"))
    python = venv / "bin" / "python"
    try:
        if not python.exists():
            _run([sys.executable, "-m", "venv", str(venv)], check=True)
        pins = [f"{name}=={version}" for name, version in floors]
        install = _run([str(python), "-m", "pip", "install", "-q", "--only-binary", ":all:", *pins, "pytest"],
                       capture_output=True)
        if install.returncode != 0:
            print(install.stdout[-3000:], install.stderr[-3000:], sep="\n")
            missing = []
            for pin in pins:  # name the floors that cannot be installed on their own
                probe = _run([str(python), "-m", "pip", "install", "-q", "--dry-run", "--no-deps", "--only-binary",
                              ":all:", pin], capture_output=True)
                if probe.returncode != 0:
                    missing.append(pin)
            print(f"FLOORS NOT INSTALLABLE here (Python {sys.version.split()[0]}): {missing or 'a conflict between them'}")
            return 1
        freeze = _run([str(python), "-m", "pip", "freeze"], capture_output=True, check=True).stdout
        wanted = {re.sub(r"[-_.]+", "-", name.lower()) for name, _ in floors}
        print("installed floors:")
        for line in freeze.splitlines():
            name = re.sub(r"[-_.]+", "-", line.split("==")[0].lower())
            if name in wanted:
                print("  " + line)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        result = _run([str(python), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SMOKE_TESTS,
                       *args.pytest_args], cwd=ROOT, env=env)
        print("check-floors:", "OK" if result.returncode == 0 else f"FAILED (pytest exit {result.returncode})")
        return result.returncode
    finally:
        if not args.keep and not args.venv:
            shutil.rmtree(venv, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
