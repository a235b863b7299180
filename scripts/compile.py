"""Compile garrison's per-request path with mypyc, in place; idempotent (`make setup` runs it).

    .venv/bin/python scripts/compile.py           # compile if a source changed (about 30 s)
    .venv/bin/python scripts/compile.py --remove  # delete the build: everything runs from source

The module list and the guard against a stale build are in garrison/native.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["GARRISON_PURE"] = "1"  # this process must not load what it is about to replace
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from garrison import native


def log(message: str) -> None:
    print(f"compile: {message}", file=sys.stderr)


# The shared library mypyc puts all compiled code in: inside the package, where an installed
# entry point finds it (a top-level module would only import from the checkout's directory).
GROUP = "garrison.compiled"
SETUP = """\
from setuptools import setup
from mypyc.build import mypycify

setup(name="garrison-compiled", ext_modules=mypycify({sources!r}, opt_level="3",
      group_name={group!r}))
"""


def shared_libraries() -> list[Path]:
    return sorted(native.PACKAGE_DIR.glob("compiled__mypyc*.so"))


def remove() -> None:
    native.RECORD.unlink(missing_ok=True)
    for module in (*native.COMPILED, *native.leftover_extensions()):
        native.extension_path(module).unlink(missing_ok=True)
    for path in shared_libraries():
        path.unlink()
    shutil.rmtree(native.ROOT / "build", ignore_errors=True)


def compile_modules() -> int:
    try:
        import mypyc  # noqa: F401
    except ImportError:
        log("mypyc is missing: it comes with mypy, in the test extras (`make setup`)")
        return 1
    digests = {module: native.source_digest(module) for module in native.COMPILED}
    remove()
    sources = [str(native.source_path(m).relative_to(native.ROOT)) for m in native.COMPILED]
    log(f"compiling {len(sources)} modules with mypyc")
    build = native.ROOT / "build"
    build.mkdir(exist_ok=True)
    (build / "setup.py").write_text(SETUP.format(sources=sources, group=GROUP))
    done = subprocess.run(
        [sys.executable, "build/setup.py", "build_ext", "--inplace"],
        cwd=native.ROOT, capture_output=True, text=True, check=False,
    )
    built = shared_libraries()
    if done.returncode != 0 or len(built) != 1:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        remove()
        log(
            "mypyc failed (output above); it needs gcc and the Python headers "
            "(Debian: apt-get install gcc libc6-dev python3-dev). garrison still runs from "
            "source, slower."
        )
        return 1
    record = {"sources": digests, "shared_library": str(built[0].relative_to(native.ROOT))}
    native.RECORD.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(native.ROOT / "build", ignore_errors=True)
    log(f"compiled: {', '.join(native.COMPILED)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remove", action="store_true", help="delete the compiled build")
    args = parser.parse_args()
    if args.remove:
        remove()
        log("removed the compiled modules; garrison runs from source")
        return 0
    state = native.check()
    if state.fresh:
        log("compiled modules are up to date")
        return 0
    return compile_modules()


if __name__ == "__main__":
    sys.exit(main())
