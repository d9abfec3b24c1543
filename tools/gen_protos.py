"""Generate the Python protobuf/gRPC modules for protos/ into sdk/llmos/.

    python tools/gen_protos.py          # write the generated files
    python tools/gen_protos.py --check  # exit 1 if the committed files differ from protos/

The .proto package `llmos.v1` becomes the Python package `llmos.v1`, so the
SDK imports its stubs as `from llmos.v1 import kernel_pb2`.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import pathlib
import shutil
import sys
import tempfile

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "sdk"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    sources = sorted(PROTOS.rglob("*.proto"))
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *map(str, sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return [p.relative_to(out_dir) for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(pathlib.Path(tmp))
        # The package's own tree only: a build of sdk/ (sdk/build/) holds copies that are not ours to check.
        committed = {p.relative_to(OUT) for p in (OUT / "llmos").rglob("*") if p.name.endswith(GENERATED_SUFFIXES)}
        stale = sorted(
            str(f) for f in files if not (OUT / f).exists() or not filecmp.cmp(pathlib.Path(tmp) / f, OUT / f, shallow=False)
        ) + sorted(str(f) for f in committed - set(files))
        if opts.check:
            if stale:
                print("generated code is out of date with protos/: " + ", ".join(stale), file=sys.stderr)
                print("run: python tools/gen_protos.py", file=sys.stderr)
                return 1
            print("generated code matches protos/")
            return 0
        for f in committed - set(files):
            os.remove(OUT / f)
        for f in files:
            (OUT / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pathlib.Path(tmp) / f, OUT / f)
        print(f"wrote {len(files)} files under {OUT.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
