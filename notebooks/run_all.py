"""Execute every notebooks/[0-9]*.ipynb in place, headless, in order (`make figures`).

Each notebook runs in its own kernel with notebooks/ as the working directory, so `import _common`
works. Stops at the first failing notebook and leaves it unwritten (the committed outputs stay).
Usage: python notebooks/run_all.py [--timeout SECONDS] [NOTEBOOK ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
# the python3 kernel of this environment (the venv), not one registered in the user's home
os.environ.setdefault("JUPYTER_PREFER_ENV_PATH", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/[0-9]*.ipynb")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = ap.parse_args()
    paths = args.notebooks or sorted(HERE.glob("[0-9]*.ipynb"))
    if not paths:
        print("no notebooks found", file=sys.stderr)
        return 1
    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {path.name} ...", end=" ", flush=True)
        start = time.time()
        nb = nbformat.read(path, as_version=4)
        # record_timing=False: no per-cell timestamps, so an unchanged rerun leaves the file unchanged;
        # the kernel logs errors only (not its warning about local TCP sockets)
        client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3", record_timing=False,
                                extra_arguments=["--IPKernelApp.log_level=ERROR"],
                                resources={"metadata": {"path": str(path.resolve().parent)}})
        try:
            client.execute()
        except Exception as e:  # a failing cell, a cell timeout, a dead kernel
            print(f"FAILED after {time.time() - start:.1f} s", flush=True)
            print(f"{path}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        nbformat.write(nb, path)
        print(f"{time.time() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
