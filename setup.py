"""Builds jaxres's one native part: oneDNN convolutions as XLA FFI handlers (optional).

`jaxres/models/_native/onednn_conv.cc` needs two sets of headers and no library: oneDNN's
(wheel `onednn-devel-cpu-gomp`) and XLA's FFI API (shipped inside `jaxlib`). libdnnl is not
linked; `jaxres.models.onednn` loads the `onednn-cpu-gomp` wheel's library (a run-time
dependency, pinned to the same version) at run time.
The headers are taken from the installed packages when the build can import them (no build
isolation), else read straight out of the two wheels (`pip download --no-deps`, from pip's
cache after the first time): installing jaxlib as a build requirement would add its numpy +
scipy to every install's isolated build environment.
A failed build (no C++ compiler, no index, another platform) only warns: the install still
succeeds, and jaxres runs CPU convolutions through XLA and its matmul backward, saying so once.
"""

import importlib.metadata
import os
import subprocess
import sys
import tempfile
import zipfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# (distribution, the header that marks its include dir, that file's path inside the wheel).
# oneDNN's version must match the `onednn-cpu-gomp` pin in pyproject.toml.
HEADERS = (
    ("onednn-devel-cpu-gomp==2023.2.0", "oneapi/dnnl/dnnl.hpp", ".data/data/include/"),
    ("jaxlib", "xla/ffi/api/ffi.h", "jaxlib/include/"),
)


def _installed_include(requirement: str, marker: str) -> str | None:
    """The include dir holding `marker` in an installed distribution, if any."""
    try:
        dist = importlib.metadata.distribution(requirement.split("==")[0])
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith(marker):
            header = os.path.abspath(str(dist.locate_file(f)))
            return header[: -len(marker)].rstrip("/")
    return None


def _wheel_include(requirement: str, marker: str, inside: str, dest: str) -> str:
    """Extracts the headers under `inside` from the distribution's wheel into `dest`."""
    wheels = os.path.join(dest, "wheels")
    # pip's isolated build environment hides the venv's site-packages (pip included) through
    # PYTHONPATH; the download runs with the venv's own pip and the user's pip configuration.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
         "-d", wheels, requirement],
        check=True,
        env=env,
    )
    dist_name = requirement.split("==")[0]
    include = os.path.join(dest, dist_name, "include")
    for wheel in os.listdir(wheels):
        if not wheel.startswith(dist_name.replace("-", "_")):
            continue
        with zipfile.ZipFile(os.path.join(wheels, wheel)) as z:
            for name in z.namelist():
                cut = name.find(inside)
                if cut >= 0 and name.endswith((".h", ".hpp")):
                    target = os.path.join(include, name[cut + len(inside) :])
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with open(target, "wb") as out:
                        out.write(z.read(name))
    if not os.path.exists(os.path.join(include, marker)):
        raise OSError(f"{marker} not found in the {dist_name} wheel")
    return include


class OptionalBuildExt(build_ext):
    """build_ext that finds its headers first, and whose failure is a warning: the kernel is an
    accelerator, not a requirement."""

    def build_extensions(self) -> None:
        built = []
        for ext in self.extensions:
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    for dist_name, marker, inside in HEADERS:
                        found = _installed_include(dist_name, marker)
                        ext.include_dirs.append(found or _wheel_include(dist_name, marker, inside, tmp))
                    self.build_extension(ext)
                built.append(ext)
            except Exception as e:  # noqa: BLE001 - any build failure falls back, never breaks pip
                msg = f"jaxres: the oneDNN convolution kernel was not built ({e}); CPU convs fall back"
                print(msg, file=sys.stderr)
                self.warn(msg)
        # What was not built is not an output (an editable install would try to copy it).
        self.extensions = built


native = sys.platform == "linux" and os.environ.get("JAXRES_ONEDNN", "1") != "0"
setup(
    ext_modules=[
        Extension(
            "jaxres.models._onednn_conv",
            sources=["jaxres/models/_native/onednn_conv.cc"],
            language="c++",
            extra_compile_args=["-std=c++17", "-O2", "-g0", "-w"],
        )
    ]
    if native
    else [],
    cmdclass={"build_ext": OptionalBuildExt},
)
