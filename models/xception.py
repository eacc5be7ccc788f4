"""PyTorch Xception backbone plus the sklesion metadata-fusion head.

A faithful re-implementation of ``keras.applications.Xception(include_top=False, pooling="avg")``
and of the head the ``sklesion`` package stacks on it, so Keras weights load one-to-one
(see ``models.sklesion.load_keras_weights``). Inputs are NCHW float tensors in 0..255; the
model's own ``Normalization`` layer does the scaling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KERAS_BN_EPS = 1e-3
KERAS_EPSILON = 1e-7  # keras.backend.epsilon(), the floor on the Normalization std


def _bn(channels: int, eps: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps)


class MaxPool2dSame(nn.Module):
    """Max pooling with TensorFlow ``padding="same"``: pads asymmetrically (extra on the bottom/right)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def _pads(self, size: int) -> tuple[int, int]:
        out = -(-size // self.stride)
        total = max((out - 1) * self.stride + self.kernel_size - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._pads(x.shape[-2])
        left, right = self._pads(x.shape[-1])
        # -inf padding so padded cells never win the max, as in TF
        x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)


class SeparableConv2d(nn.Module):
    """Keras ``SeparableConv2D`` (3x3 depthwise, "same" padding, then 1x1 pointwise; no bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, kernel_size, padding=kernel_size // 2, groups=in_channels, bias=False
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class DownBlock(nn.Module):
    """Entry/exit-flow block: two separable convs, a 3x3/2 max pool, and a strided 1x1 shortcut."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, relu_first: bool = True, eps: float = KERAS_BN_EPS):
        super().__init__()
        self.relu_first = relu_first
        self.sepconv1 = SeparableConv2d(in_ch, mid_ch)
        self.sepconv1_bn = _bn(mid_ch, eps)
        self.sepconv2 = SeparableConv2d(mid_ch, out_ch)
        self.sepconv2_bn = _bn(out_ch, eps)
        self.pool = MaxPool2dSame(3, 2)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=2, bias=False)
        self.shortcut_bn = _bn(out_ch, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut_bn(self.shortcut(x))
        # block2 follows a ReLU already; later blocks start with one (Keras' blockN_sepconv1_act)
        y = F.relu(x) if self.relu_first else x
        y = self.sepconv1_bn(self.sepconv1(y))
        y = self.sepconv2_bn(self.sepconv2(F.relu(y)))
        return self.pool(y) + residual


class MiddleBlock(nn.Module):
    """Middle-flow block: three ReLU-separable-conv-BN units with an identity shortcut."""

    def __init__(self, channels: int = 728, eps: float = KERAS_BN_EPS):
        super().__init__()
        for i in (1, 2, 3):
            setattr(self, f"sepconv{i}", SeparableConv2d(channels, channels))
            setattr(self, f"sepconv{i}_bn", _bn(channels, eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for i in (1, 2, 3):
            y = getattr(self, f"sepconv{i}_bn")(getattr(self, f"sepconv{i}")(F.relu(y)))
        return y + x


class Xception(nn.Module):
    """Xception feature extractor; ``forward`` returns the (N, 2048) global-average-pooled features."""

    feature_dim = 2048

    def __init__(self, eps: float = KERAS_BN_EPS):
        super().__init__()
        # entry flow
        self.block1_conv1 = nn.Conv2d(3, 32, 3, stride=2, bias=False)
        self.block1_conv1_bn = _bn(32, eps)
        self.block1_conv2 = nn.Conv2d(32, 64, 3, bias=False)
        self.block1_conv2_bn = _bn(64, eps)
        self.block2 = DownBlock(64, 128, 128, relu_first=False, eps=eps)
        self.block3 = DownBlock(128, 256, 256, eps=eps)
        self.block4 = DownBlock(256, 728, 728, eps=eps)
        # middle flow (Keras blocks 5..12)
        self.middle = nn.ModuleList(MiddleBlock(728, eps) for _ in range(8))
        # exit flow
        self.block13 = DownBlock(728, 728, 1024, eps=eps)
        self.block14_sepconv1 = SeparableConv2d(1024, 1536)
        self.block14_sepconv1_bn = _bn(1536, eps)
        self.block14_sepconv2 = SeparableConv2d(1536, 2048)
        self.block14_sepconv2_bn = _bn(2048, eps)

    def _entry(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.block1_conv1_bn(self.block1_conv1(x)))
        x = F.relu(self.block1_conv2_bn(self.block1_conv2(x)))
        return self.block4(self.block3(self.block2(x)))

    def _block14(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.block14_sepconv1_bn(self.block14_sepconv1(x)))
        return F.relu(self.block14_sepconv2_bn(self.block14_sepconv2(x)))

    STAGES = ("entry", *(f"middle{i}" for i in range(8)), "block13", "block14")
    """Stage names in forward order: the units a fine-tune can unfreeze from (see ``stage_modules``)."""

    def stage_modules(self, name: str) -> list[nn.Module]:
        """The modules whose parameters belong to stage ``name``."""
        if name == "entry":
            return [self.block1_conv1, self.block1_conv1_bn, self.block1_conv2, self.block1_conv2_bn, self.block2, self.block3, self.block4]
        if name.startswith("middle"):
            return [self.middle[int(name.removeprefix("middle"))]]
        if name == "block13":
            return [self.block13]
        if name == "block14":
            return [self.block14_sepconv1, self.block14_sepconv1_bn, self.block14_sepconv2, self.block14_sepconv2_bn]
        raise ValueError(f"unknown stage {name!r}; valid: {list(self.STAGES)}")

    def forward_stages(self, x: torch.Tensor, start: str = "entry", stop: str | None = None) -> torch.Tensor:
        """Run stages ``start`` .. ``stop`` (exclusive; None = to the end) on ``x``, the previous stage's output."""
        i = self.STAGES.index(start)
        j = len(self.STAGES) if stop is None else self.STAGES.index(stop)
        for name in self.STAGES[i:j]:
            if name == "entry":
                x = self._entry(x)
            elif name.startswith("middle"):
                x = self.middle[int(name.removeprefix("middle"))](x)
            else:
                x = self.block13(x) if name == "block13" else self._block14(x)
        return x

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """The final (N, 2048, h, w) activation map."""
        return self.forward_stages(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_map(x).mean(dim=(2, 3))


class KerasNormalization(nn.Module):
    """Keras ``Normalization`` over the channel axis: ``(x - mean) / max(sqrt(var), 1e-7)``."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("variance", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std = torch.sqrt(self.variance).clamp_min(KERAS_EPSILON)
        return (x - self.mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


class FusionHead(nn.Module):
    """sklesion's head: image branch Dense(264)+BN, metadata branch Dense(224)+BN+Dense(64)+BN,
    concatenated (image first) into Dense(32)+BN and a 7-way softmax. Dropouts are inference no-ops."""

    def __init__(
        self,
        feature_dim: int = 2048,
        meta_dim: int = 10,
        n_classes: int = 7,
        widths: tuple[int, int, int, int] = (264, 224, 64, 32),
        eps: float = KERAS_BN_EPS,
    ):
        super().__init__()
        img_w, meta_w1, meta_w2, fuse_w = widths
        self.img_dense = nn.Linear(feature_dim, img_w)
        self.img_bn = nn.BatchNorm1d(img_w, eps=eps)
        self.meta_dense1 = nn.Linear(meta_dim, meta_w1)
        self.meta_bn1 = nn.BatchNorm1d(meta_w1, eps=eps)
        self.meta_dense2 = nn.Linear(meta_w1, meta_w2)
        self.meta_bn2 = nn.BatchNorm1d(meta_w2, eps=eps)
        self.fuse_dense = nn.Linear(img_w + meta_w2, fuse_w)
        self.fuse_bn = nn.BatchNorm1d(fuse_w, eps=eps)
        self.out = nn.Linear(fuse_w, n_classes)

    def forward(self, features: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, n_classes)."""
        img = self.img_bn(F.relu(self.img_dense(features)))
        m = self.meta_bn1(F.relu(self.meta_dense1(meta)))
        m = self.meta_bn2(F.relu(self.meta_dense2(m)))
        z = self.fuse_bn(F.relu(self.fuse_dense(torch.cat([img, m], dim=1))))
        return torch.softmax(self.out(z), dim=1)


class SklesionNet(nn.Module):
    """Normalization -> Xception -> fusion head. ``forward(images, meta) -> (probs, pooled features)``."""

    def __init__(self, eps: float = KERAS_BN_EPS, n_classes: int = 7, meta_dim: int = 10):
        super().__init__()
        self.norm = KerasNormalization(3)
        self.backbone = Xception(eps)
        self.head = FusionHead(Xception.feature_dim, meta_dim, n_classes, eps=eps)

    def forward(self, images: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(self.norm(images))
        return self.head(features, meta), features
