"""The committed GPU results this machine's kind of device measured.

    python -m benchmarks.same_card RESULTS_DIR NAME [NAME ...]

Prints ``NAME PATH`` for each ``NAME`` with a file ``NAME.json`` or
``NAME-*.json`` in ``RESULTS_DIR`` (e.g. ``memory-gpu.json``, an H200's,
and ``memory-gpu-h100.json``) whose ``meta.device_kind`` is that of
``jax.devices()[0]``: ``launch/gpu_checks.sh`` copies it into ``$OUT``
under the plain name, so the benchmarks' ``--merge`` adds to it. One
process for all names (starting a GPU backend takes seconds).
"""
from __future__ import annotations

import glob
import json
import os
import sys
from typing import Sequence


def pick(results_dir: str, names: Sequence[str], device_kind: str
         ) -> dict[str, str]:
  """``{name: path}``: per name, the first file (the plain name, then the
  suffixed ones in sorted order) measured on ``device_kind``; names with
  none are left out. Files that are not results are passed over."""
  found = {}
  for name in names:
    candidates = [os.path.join(results_dir, f"{name}.json")] + sorted(
        glob.glob(os.path.join(results_dir, f"{name}-*.json")))
    for path in candidates:
      try:
        with open(path) as f:
          kind = json.load(f)["meta"].get("device_kind")
      except (OSError, ValueError, KeyError, TypeError, AttributeError):
        continue
      if kind == device_kind:
        found[name] = path
        break
  return found


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if len(argv) < 2:
    print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
    return 2
  import jax
  for name, path in pick(argv[0], argv[1:],
                         jax.devices()[0].device_kind).items():
    print(name, path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
