"""Check that every installed package is the version constraints.txt pins.

A constraints file pins only the packages it names: a new dependency (or a new dependency of a
dependency) would install at whatever release is newest that day, which is how the suite met
transformers 5.25 unannounced.  CI runs this right after installing; it names every package that is
installed but not pinned, and every one installed at another version.

    python scripts/check_pins.py constraints.txt      # exit 0: the environment is the pinned one

torch is left to the user (a CUDA build of their own) and checked against pyproject's range by pip;
pip, setuptools and wheel belong to the virtual environment, and tpplan is the project itself.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

UNPINNED = {"torch", "tpplan", "pip", "setuptools", "wheel"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str) -> dict[str, str]:
    pins = {}
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            name, sep, version = line.partition("==")
            if not sep or not version.strip():
                raise SystemExit(f"{path}:{number}: error: not an exact pin (NAME==VERSION): {line}")
            pins[normalized(name.strip())] = version.strip()
    return pins


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/check_pins.py constraints.txt", file=sys.stderr)
        return 2
    pins = read_pins(argv[0])
    problems = []
    for dist in metadata.distributions():
        name = normalized(dist.metadata["Name"])
        if name in UNPINNED:
            continue
        if name not in pins:
            problems.append(f"{name}=={dist.version} is installed but not pinned in {argv[0]}")
        elif dist.version != pins[name]:
            problems.append(f"{name} is {dist.version}, {argv[0]} pins {pins[name]}")
    for problem in sorted(problems):
        print("error:", problem, file=sys.stderr)
    if problems:
        print("  hint: pin the tested version (pip freeze) or install with -c constraints.txt", file=sys.stderr)
        return 1
    print(f"ok: every installed package is pinned in {argv[0]} ({len(pins)} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
