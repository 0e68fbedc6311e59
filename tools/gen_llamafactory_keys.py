"""Refresh daemon/train/llamafactory_keys.json, the fallback key catalogue shipped with ftmllm.

A developer tool. The daemon does not need it: it generates the catalogue of the LLaMA-Factory that
``train.llamafactory_cli`` runs at first use and caches it per version (daemon/train/catalogue.py); the shipped
copy is used as is when that version is the shipped one, and only as a fallback (with a warning) when
generating fails. Run it with the python of a venv where llamafactory is installed (never the daemon's venv):

    ~/.cache/ftmllm-test/llamafactory-<hash>/bin/python tools/gen_llamafactory_keys.py [OUT.json]

The generator itself is daemon/train/keygen.py (shipped in the package, so an installed daemon has it).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYGEN = ROOT / "daemon" / "train" / "keygen.py"
DEFAULT_OUT = ROOT / "daemon" / "train" / "llamafactory_keys.json"


def main(argv: list[str]) -> int:
    out = argv[1] if len(argv) > 1 else str(DEFAULT_OUT)
    keygen = runpy.run_path(str(KEYGEN))  # by path: daemon/ is not importable from LLaMA-Factory's venv
    return int(keygen["main"]([str(KEYGEN), out]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
