"""Readers of the official dataset archives, or of the folders they extract to.

`input_files` gives the files of a plain or compressed tar, of a tar.gz held
inside a zip, or of a folder, as `{path: reader}`; `class_files` groups the
image paths `.../<root>/<class>/<file>` by class, and returns the other files
of the class folders (`.txt`, `.DS_Store`, `Thumbs.db`) with the reason they
are left out, for the dataset's `skipped` list. Archive member names and
folder paths come out alike (`<root>/<class>/<file>`), whichever form the
dataset arrived in.
"""

from __future__ import annotations

import logging
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from jaxres.data import sources
from jaxres.errors import DataError

log = logging.getLogger(__name__)


class ClassFiles(NamedTuple):
    """`class_files`' result: the images by class, and the files left out."""

    classes: dict[str, dict[str, Any]]  # {class: {file: reader}}
    ignored: list[tuple[str, str]]  # (class/file, reason), sorted.


def _not_read() -> bytes:
    return b""  # A non-image member of a compressed tar: named in `skipped`, never read.


def _member_reader(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[], bytes]:
    return lambda: tar.extractfile(member).read()


def _tar_files(tar_path: Path | None = None, fileobj: Any = None) -> dict[str, Callable[[], bytes]]:
    """Files of a tar by member name: read on demand from a plain tar, held in memory from a stream."""
    files: dict[str, Callable[[], bytes]] = {}
    if fileobj is None and tarfile.is_tarfile(tar_path) and not _is_compressed(tar_path):
        tar = tarfile.open(tar_path, "r:")  # noqa: SIM115 - stays open: members are read on demand.
        for member in tar.getmembers():
            if member.isfile():
                files[_clean(member.name)] = _member_reader(tar, member)
        return files
    # A compressed tar cannot seek cheaply: stream it once and keep the images (Caltech-101: 130 MB).
    with tarfile.open(tar_path, "r|*", fileobj=fileobj) as tar:
        for member in tar:
            if not member.isfile():
                continue
            if member.name.lower().endswith(sources.IMAGE_EXTENSIONS):
                data = tar.extractfile(member).read()
                files[_clean(member.name)] = lambda data=data: data
            else:
                files[_clean(member.name)] = _not_read
    return files


def _is_compressed(path: Path) -> bool:
    with open(path, "rb") as f:
        magic = f.read(3)
    return magic[:2] == b"\x1f\x8b" or magic == b"BZh" or magic[:2] == b"\xfd7"


def _clean(name: str) -> str:
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _folder_files(root: Path) -> dict[str, Callable[[], bytes]]:
    """Files under `root` by path relative to root's parent (so the folder name stays in the path)."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            files[path.relative_to(root.parent).as_posix()] = path.read_bytes
    return files


def _zip_files(zip_path: Path, inner_archive: str) -> dict[str, Callable[[], bytes]]:
    """Files of a tar.gz held inside a zip (as `caltech-101.zip` holds `101_ObjectCategories.tar.gz`)."""
    with zipfile.ZipFile(zip_path) as zf:
        inner = [n for n in zf.namelist() if n.endswith(inner_archive) and "__MACOSX" not in n]
        if not inner:
            raise DataError(
                f"{zip_path} holds no {inner_archive}; is it the archive the dataset's authors distribute?"
            )
        with zf.open(inner[0]) as f:
            return _tar_files(fileobj=f)


def find_input(manual_dir: Path, candidates: Sequence[str], dataset: str) -> Path:
    """The first of `candidates` (archives or folders) present in `manual_dir`."""
    for name in candidates:
        if (manual_dir / name).exists():
            return manual_dir / name
    if manual_dir.name in candidates and manual_dir.is_dir():
        return manual_dir
    raise DataError(
        f"No {dataset} data in {manual_dir}: expected one of {', '.join(candidates)} there "
        "(the archives as the dataset's authors distribute them, or the extracted folder). "
        "Download it and pass its folder as --manual_dir."
    )


def input_files(path: Path, inner_archive: str = "") -> dict[str, Callable[[], bytes]]:
    """Files of a folder, a zip holding the tar `inner_archive`, or a tar, by path."""
    if path.is_dir():
        return _folder_files(path)
    if path.suffix == ".zip":
        return _zip_files(path, inner_archive)
    return _tar_files(path)


def class_files(
    files: dict[str, Any], root_name: str, exclude: Sequence[str] = ()
) -> ClassFiles:
    """The images `.../root_name/<class>/<file>` by class, and the other files there with why.

    Deeper paths, the `exclude`d classes and macOS `__MACOSX` copies are not
    read. A folder holding no image is not a class (it is warned about).
    """
    classes: dict[str, dict[str, Any]] = {}
    others: dict[str, list[tuple[str, str]]] = {}
    for name, read in files.items():
        parts = name.split("/")
        if root_name not in parts[:-2] or "__MACOSX" in parts:
            continue
        rest = parts[parts.index(root_name) + 1 :]
        if len(rest) != 2 or rest[0] in exclude:
            continue
        reason = sources.not_image_reason(rest[1])
        if reason is None:
            classes.setdefault(rest[0], {})[rest[1]] = read
        else:
            others.setdefault(rest[0], []).append((f"{rest[0]}/{rest[1]}", reason))
    if not classes:
        raise DataError(
            f"Found no {root_name}/<class>/<image> files; is this the right archive or folder?"
        )
    ignored = []
    for folder in sorted(others):
        entries = sorted(others[folder])
        sources.warn_ignored(f"{root_name}/{folder}", entries)
        if folder not in classes:
            log.warning("Folder %s/%s holds no images; it is not a class.", root_name, folder)
        ignored += entries
    return ClassFiles(classes, ignored)
