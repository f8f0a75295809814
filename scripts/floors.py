"""Print ``pkg==floor`` for every ``pkg>=floor`` that pyproject.toml declares (dependencies and
the extras named on the command line); torch is left out (check_floors.sh pins it)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
specs = list(project["project"]["dependencies"])
for extra in sys.argv[1:]:
    specs += project["project"]["optional-dependencies"][extra]
for spec in specs:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([^,;\s]+)", spec.strip())
    if m and m.group(1) != "torch":
        print(f"{m.group(1)}=={m.group(2)}")
