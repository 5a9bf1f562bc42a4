"""timm beside the CPU build of torch: the EfficientNetV2 oracle of the tests and the PyTorch
peer of the benchmarks (``scripts/torch_peer.py``) for V2.

timm imports torchvision (``FrozenBatchNorm2d``, its data transforms). The torchvision release
that pairs with torch 2.13.0 is 0.28.0, and the registry's wheel of it is a CUDA build: its
compiled operators (``torchvision/_C.so``) link against libtorch_cuda and do not load beside
torch 2.13.0+cpu. torchvision notices that (``extension._has_ops()`` is False) and its Python
code still imports, except for two lines: ``torchvision/_meta_registrations.py`` registers fake
kernels for ``torchvision::nms`` and ``torchvision::qnms`` unconditionally, which fails with
"operator torchvision::nms does not exist", and so ``import timm`` fails.

``import_timm`` imports timm; when that fails for exactly this reason, it declares the schemas
of those two operators (the ones torchvision's C++ code would have registered) and imports
again. Nothing here calls nms or any other compiled torchvision operator: timm's
EfficientNets are plain torch modules. Where torchvision's operators do load (a CPU build of
torchvision, or CUDA torch), the first import succeeds and nothing is declared.
"""

from __future__ import annotations

import sys
from typing import Any

# torchvision's own schemas (csrc/ops/nms.cpp), for the operators it registers fakes for
# whether or not its compiled operators loaded.
_SCHEMAS = (
    'nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor',
    'qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor',
)
_library: Any = None  # keeps the declared schema registered for the life of the process


def _forget(prefixes: tuple[str, ...]) -> None:
    for name in list(sys.modules):
        if name in prefixes or name.startswith(tuple(p + '.' for p in prefixes)):
            del sys.modules[name]


def import_timm() -> Any:
    """The timm module (see the module docstring for the torchvision schema it may declare)."""
    global _library
    try:
        import timm
    except RuntimeError as e:
        if 'torchvision::nms' not in str(e) or _library is not None:
            raise
        import torch

        _forget(('timm', 'torchvision'))  # the half-imported modules of the failed attempt
        _library = torch.library.Library('torchvision', 'DEF')
        for schema in _SCHEMAS:
            _library.define(schema)
        import timm
    return timm


def torchvision_ops_loaded() -> bool:
    """Whether torchvision's compiled operators loaded (False for the CUDA wheel beside CPU
    torch, where ``import_timm`` declared the two schemas itself)."""
    import_timm()
    import torchvision.extension

    return bool(torchvision.extension._has_ops())
