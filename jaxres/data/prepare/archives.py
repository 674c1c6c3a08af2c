"""Readers of the official dataset archives, or of the folders they extract to.

`input_files` gives the files of a plain or compressed tar, of a tar.gz held
inside a zip, or of a folder, as `{path: reader}`; `class_files` groups the
image paths `.../<root>/<class>/<file>` by class. Archive member names and
folder paths come out alike (`<root>/<class>/<file>`), whichever form the
dataset arrived in.
"""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxres.data import sources
from jaxres.errors import DataError


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
            if member.isfile() and member.name.lower().endswith(sources.IMAGE_EXTENSIONS):
                data = tar.extractfile(member).read()
                files[_clean(member.name)] = lambda data=data: data
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
) -> dict[str, dict[str, Any]]:
    """{class: {file: reader}} for image paths `.../root_name/<class>/<file>` (deeper paths ignored)."""
    classes: dict[str, dict[str, Any]] = {}
    for name, read in files.items():
        parts = name.split("/")
        if root_name not in parts[:-2] or not name.lower().endswith(sources.IMAGE_EXTENSIONS):
            continue
        rest = parts[parts.index(root_name) + 1 :]
        if len(rest) == 2 and rest[0] not in exclude and not rest[1].startswith("."):
            classes.setdefault(rest[0], {})[rest[1]] = read
    if not classes:
        raise DataError(
            f"Found no {root_name}/<class>/<image> files; is this the right archive or folder?"
        )
    return classes
