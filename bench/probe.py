"""Linear probes of colour, shape, position and count: the command line of `vlkit/probe.py`.

    python bench/probe.py runs/demo/instruct                 # a run dir, checkpoint or vlkit folder
    python bench/probe.py runs/demo/clip --layer -2          # a CLIP folder: its vision tower only
    python bench/probe.py MODEL --data data/shapes --n-train 3000 --out probe.json

The probe itself lives in the package (the demo runs it from an installed vlkit too);
`python -m vlkit.probe` is the same command.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data_tools and vlkit from this checkout

from vlkit.probe import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
