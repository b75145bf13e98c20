"""torchvision's and timm's own model code, for the tests that check fuse and the conversions on
the libraries themselves (test_real_models.py).

Neither library is a dependency, and torchvision's wheel does not import beside a CPU build of
torch ("operator torchvision::nms does not exist": its C extension is built for another torch).
`./dev setup` downloads both wheels (never installs them) into $RESNET_ABLATE_INTEROP_WHEELS
(default .cache/interop-wheels); `real_libraries()` reads the model files straight from them:
`torchvision` and `torchvision.models` are stand-in packages whose `__init__.py` (which loads the
extension and every model family) is skipped, so that torchvision/models/{vgg,densenet,regnet,
resnet,googlenet}.py import on their own; timm is pure Python and imports as it is. They sit in
`sys.modules` only inside the context, so other tests see no torchvision. Without the wheels
`LibrariesAbsent` says where they should be, and the tests skip with that reason.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import os
import sys
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path

INTEROP_WHEELS = Path(os.environ.get("RESNET_ABLATE_INTEROP_WHEELS",
                                     Path(__file__).resolve().parents[1] / ".cache" / "interop-wheels"))
TORCHVISION_MODEL_FILES = ("vgg", "densenet", "regnet", "resnet", "googlenet")
_loaded: dict[str, types.ModuleType] = {}  # what importing the real code added to sys.modules


class LibrariesAbsent(RuntimeError):
    """The wheels of torchvision and timm are not in the cache; the message says where to get them."""


def _extracted(library: str) -> Path:
    wheels = sorted(INTEROP_WHEELS.glob(f"{library}-*.whl"))
    if not wheels:
        raise LibrariesAbsent(f"no {library} wheel in {INTEROP_WHEELS}: run ./dev setup (it downloads "
                              "torchvision's and timm's wheels there) or set RESNET_ABLATE_INTEROP_WHEELS")
    target = INTEROP_WHEELS / "extracted" / wheels[-1].stem
    if not (target / library).is_dir():
        with zipfile.ZipFile(wheels[-1]) as wheel:  # the Python files only: no C extension
            wheel.extractall(target, [n for n in wheel.namelist()
                                      if n.startswith(f"{library}/") and not n.endswith(".so")])
    return target


def _stand_in(name: str, folder: Path) -> types.ModuleType:
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    package.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    sys.modules[name] = package
    return package


def _load() -> None:
    tv_root, timm_root = _extracted("torchvision"), _extracted("timm")
    before = set(sys.modules)
    sys.path.insert(0, str(timm_root))
    try:
        _stand_in("torchvision", tv_root / "torchvision")
        _stand_in("torchvision.models", tv_root / "torchvision" / "models")
        for name in TORCHVISION_MODEL_FILES:
            importlib.import_module(f"torchvision.models.{name}")
        importlib.import_module("timm")
    finally:
        sys.path.remove(str(timm_root))
        added = {name: sys.modules.pop(name) for name in set(sys.modules) - before
                 if name.split(".")[0] in ("torchvision", "timm")}
    _loaded.update(added)


@contextlib.contextmanager
def real_libraries() -> Iterator[types.SimpleNamespace]:
    """Within: `.torchvision` (the model files by name: vgg, densenet, regnet, resnet, googlenet)
    and `.timm`, the libraries' own code. Raises LibrariesAbsent where the wheels are not in the cache."""
    if not _loaded:
        _load()
    shadowed = {name: sys.modules.get(name) for name in _loaded}
    sys.modules.update(_loaded)
    try:
        yield types.SimpleNamespace(
            torchvision={n: _loaded[f"torchvision.models.{n}"] for n in TORCHVISION_MODEL_FILES},
            timm=_loaded["timm"])
    finally:
        for name, module in shadowed.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
