"""Generate server/loramux/pb/ from protos/ (run: python scripts/gen_protos.py).

grpc_tools writes `from loramux.v1 import ...`, which would clash with our own package
`loramux`; imports are rewritten to `loramux.pb.loramux.v1`. `--check` compares instead of
writing and exits 1 when the committed stubs are stale.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "server" / "loramux" / "pb"


def generate(dest: Path) -> None:
    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={dest}",
            f"--pyi_out={dest}", f"--grpc_python_out={dest}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in dest.rglob("*.py*"):
        text = path.read_text().replace("from loramux.v1 import", "from loramux.pb.loramux.v1 import")
        path.write_text(text)
    for folder in [dest, *(p for p in dest.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()


def main() -> int:
    if "--check" not in sys.argv:
        generate(OUT)
        print(f"wrote {OUT}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = {p.relative_to(tmp): p.read_bytes() for p in Path(tmp).rglob("*") if p.is_file()}
    committed = {p.relative_to(OUT): p.read_bytes() for p in OUT.rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
    stale = sorted(str(k) for k in fresh.keys() | committed.keys() if fresh.get(k) != committed.get(k))
    if stale:
        print("stale generated stubs (run python scripts/gen_protos.py):", *stale, sep="\n  ")
        return 1
    print("generated stubs are up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
