"""Download the official small English Vosk model: pinned URL and sha256, unpacked atomically.

Either the finished model folder appears under its final name, or nothing does: the archive and the
half-unpacked folder live under temporary names next to the target and are removed on any failure.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import DownloadError
from .stt import MODELS_DIR, vosk_model_problems

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelArchive:
    url: str
    sha256: str
    name: str  # folder the archive holds, and the folder we create


SMALL_EN_US = ModelArchive(
    url="https://alphacephei.com/vosk/models/vosk-model-small-en-us-0.15.zip",
    sha256="30f26242c4eb449f948e42cb302dd7a686cb29a3423a8367f99ff41780942498",  # 41,205,931 bytes, Apache-2.0
    name="vosk-model-small-en-us-0.15",
)
_BLOCK = 1 << 20


def download_vosk_model(dest_dir: str | Path = MODELS_DIR, archive: ModelArchive = SMALL_EN_US,
                        force: bool = False, timeout: float = 60.0, progress: bool = True) -> Path:
    """Fetch `archive`, check its sha256, unpack it to dest_dir/archive.name; return that folder."""
    dest_dir = Path(dest_dir)
    target = dest_dir / archive.name
    if target.exists() and not force:
        if not vosk_model_problems(target):
            logger.info("%s is already there", target)
            return target
        raise DownloadError(f"{target} exists but is not a complete Vosk model. Fix: delete it, or pass --force.")
    created = not dest_dir.exists()
    dest_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".part", dir=dest_dir))
    try:
        zip_path = work / "model.zip"
        digest = _fetch(archive.url, zip_path, timeout, progress)
        if digest != archive.sha256:
            raise DownloadError(f"checksum mismatch for {archive.url}: expected sha256 {archive.sha256}, got "
                                f"{digest}. The file is damaged or was changed upstream; nothing was installed. "
                                "Fix: try again later, or pin the new checksum after checking it.")
        unpacked = _unpack(zip_path, work / "unpacked", archive.name)
        problems = vosk_model_problems(unpacked)
        if problems:
            raise DownloadError(f"{archive.url} does not hold a Vosk model ({'; '.join(problems)}).")
        if target.exists():  # --force: swap out the old folder only once the new one is complete
            shutil.rmtree(target)
        os.replace(unpacked, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created and not any(dest_dir.iterdir()):
            dest_dir.rmdir()
    logger.info("installed %s", target)
    return target


def _fetch(url: str, path: Path, timeout: float, progress: bool) -> str:
    sha = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(path, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = _progress(total, url, progress)
            while block := response.read(_BLOCK):
                sha.update(block)
                out.write(block)
                bar.update(len(block))
            bar.close()
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"could not download {url} ({exc}). Fix: check the network, or download it "
                            "by hand and pass the unpacked folder with --vosk-model.") from exc
    return sha.hexdigest()


def _progress(total: int | None, url: str, enabled: bool) -> Any:  # a tqdm bar
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], disable=not enabled)


def _unpack(zip_path: Path, out: Path, name: str) -> Path:
    """Extract safely (no absolute paths, no '..'); return the model folder inside."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for member in archive.namelist():
                parts = PurePosixPath(member).parts
                if member.startswith("/") or ".." in parts:
                    raise DownloadError(f"the archive has an unsafe path {member!r}; refusing to unpack it.")
            archive.extractall(out)
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"the download is not a zip archive ({exc}).") from exc
    inner = out / name
    if inner.is_dir():
        return inner
    entries = [p for p in out.iterdir() if p.is_dir()]
    return entries[0] if len(entries) == 1 and not (out / "am").exists() else out
