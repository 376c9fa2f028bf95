"""Print pyproject.toml's lower bounds as pip constraints: `pkg>=X,<Y` becomes `pkg==X`.

`make test-lowest` installs with them, so every lower bound stated is one the suite ran on.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def lower_bounds(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    pins = []
    for requirement in requirements:
        match = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*[^;]*?>=\s*([^,;\s]+)", requirement)
        if match:
            pins.append(f"{match.group(1)}=={match.group(3)}")
    return pins


if __name__ == "__main__":
    print("\n".join(lower_bounds(Path(sys.argv[1]))))
