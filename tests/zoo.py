"""A zoo of tiny but structurally faithful models (no torchvision), for discovery tests.

Each entry: a factory building the model (seeded, so two calls give the same weights) and an
example input. Channel counts are small so that the whole zoo runs in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> activation."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# ---- VGG-BN --------------------------------------------------------------------------------


class VGGBN(nn.Module):
    """VGG with BatchNorm: conv-bn-relu stacks, max pools, flatten, MLP classifier with dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 2 * 2, 32), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ---- ResNet --------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1x1 -> 3x3 -> 1x1 x4) with projection shortcut."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """Stem, a basic block, a strided basic block, two bottleneck blocks, pool, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2))
        self.layer3 = nn.Sequential(Bottleneck(16, 6, 2), Bottleneck(24, 6))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---- MobileNetV2 ---------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 linear projection (+ identity)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1, act=nn.ReLU6))
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """Stem, inverted residuals (t=1, strided t=4, residual t=4), 1x1 head, dropout, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 8, 3, 2, act=nn.ReLU6),
            InvertedResidual(8, 8, 1, 1),
            InvertedResidual(8, 12, 2, 4),
            InvertedResidual(12, 12, 1, 4),
            conv_bn(12, 32, 1, act=nn.ReLU6),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


# ---- EfficientNet-style MBConv with squeeze-excitation ----------------------------------------


class SqueezeExcite(nn.Module):
    """``x * sigmoid(fc2(silu(fc1(pool(x)))))`` with 1x1 convs as the fc layers."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.fc2(F.silu(self.fc1(s)))
        return x * torch.sigmoid(s)


class MBConv(nn.Module):
    """EfficientNet block: expand, depthwise, SE gate, project, identity when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = conv_bn(cin, hidden, 1, act=nn.SiLU)
        self.dw = conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.SiLU)
        self.se = SqueezeExcite(hidden, max(1, cin // 4))
        self.project = conv_bn(hidden, cout, 1, act=None)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.dw(self.expand(x))))
        return out + x if self.use_res else out


class EfficientNet(nn.Module):
    """Stem, two MBConv blocks (the second residual), 1x1 head, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2, act=nn.SiLU)
        self.blocks = nn.Sequential(MBConv(8, 12, 2, 4), MBConv(12, 12, 1, 4))
        self.head = conv_bn(12, 24, 1, act=nn.SiLU)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(x.mean((2, 3)))


# ---- DenseNet ------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 producing ``growth`` new channels."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class DenseNet(nn.Module):
    """Stem, a dense block of three layers (concatenation), transition, final norm, classifier."""

    def __init__(self, growth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.layers = nn.ModuleList(DenseLayer(8 + i * growth, growth) for i in range(3))
        c = 8 + 3 * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 10, 1, bias=False),
                                        nn.AvgPool2d(2))
        self.norm = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(features))
        x = self.transition(torch.cat(features, 1))
        x = F.relu(self.norm(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ---- Inception -----------------------------------------------------------------------------


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1; 1x1-3x3; 1x1-3x3-3x3; pool-1x1) concatenated."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, 4, 1)
        self.b2 = nn.Sequential(conv_bn(cin, 4, 1), conv_bn(4, 6, 3))
        self.b3 = nn.Sequential(conv_bn(cin, 2, 1), conv_bn(2, 4, 3), conv_bn(4, 4, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, 3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class Inception(nn.Module):
    """Stem, two inception blocks, pool, dropout, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8, 3)
        self.block1 = InceptionBlock(8)
        self.block2 = InceptionBlock(17)
        self.dropout = nn.Dropout(0.3)
        self.fc = nn.Linear(17, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


# ---- ShuffleNetV2 --------------------------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's view -> transpose -> view interleaving of channel groups."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: stride 2 runs two branches on x; stride 1 splits x in halves."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, act=None),
                                         conv_bn(cin, half, 1))
            inp = cin
        else:
            self.branch1 = nn.Sequential()
            inp = half
        self.branch2 = nn.Sequential(conv_bn(inp, half, 1),
                                     conv_bn(half, half, 3, stride, groups=half, act=None),
                                     conv_bn(half, half, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """Stem, strided unit, split unit, strided unit, 1x1 head conv, classifier.

    The last unit is strided: its two branches are coupled by the channel shuffle and reach the
    head conv at interleaved positions. The split unit's ``chunk`` ties the halves of the first
    unit's shuffled output to each other in a different unit order, so those are not prunable.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.stage = nn.Sequential(ShuffleUnit(8, 16, 2), ShuffleUnit(16, 16, 1),
                                   ShuffleUnit(16, 24, 2))
        self.conv5 = conv_bn(24, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stage(self.stem(x)))
        return self.fc(x.mean([2, 3]))


# ---- U-Net ---------------------------------------------------------------------------------


def double_conv(cin: int, cout: int) -> nn.Sequential:
    """Two conv-bn-relu layers."""
    return nn.Sequential(conv_bn(cin, cout), conv_bn(cout, cout))


class UNet(nn.Module):
    """Two-level U-Net: encoder, bottleneck, ConvTranspose upsampling, skip concatenations."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = double_conv(3, 8)
        self.enc2 = double_conv(8, 12)
        self.mid = double_conv(12, 16)
        self.up2 = nn.ConvTranspose2d(16, 12, 2, 2)
        self.dec2 = double_conv(24, 12)
        self.up1 = nn.ConvTranspose2d(12, 8, 2, 2)
        self.dec1 = double_conv(16, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


# ---- ConvNeXt ------------------------------------------------------------------------------


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 -> permute to NHWC -> LayerNorm -> Linear x4 -> GELU -> Linear -> scale."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + x


class ConvNeXt(nn.Module):
    """Patchify stem + channels-first LayerNorm, two blocks, pooled LayerNorm head."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 4, 4), nn.LayerNorm(dim, eps=1e-6))
        self.blocks = nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem[0](x)
        x = self.stem[1](x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.blocks(x)
        return self.head(self.norm(x.mean([-2, -1])))


# ---- Transformer encoder -------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (see test_zoo's notes)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, -1).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, -1).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        y = att.softmax(dim=-1) @ v
        # -1, not the input width: the attention width stays when the residual width shrinks
        y = y.transpose(1, 2).reshape(b, t, -1)
        return self.out(y)


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.1),
                                 nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Token embedding + learned positions, two encoder layers, final norm, mean-pool head."""

    def __init__(self, vocab: int = 50, dim: int = 16, tokens: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.1)
        self.layers = nn.Sequential(EncoderLayer(dim, 2, 32), EncoderLayer(dim, 2, 32))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos
        x = self.norm(self.layers(x))
        return self.head(x.mean(dim=1))


# ---- registry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A zoo model: how to build it and an example input."""

    name: str
    build: Callable[[], nn.Module]
    example: Callable[[], torch.Tensor]


def _seeded(cls: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        m = cls()
        # non-trivial BatchNorm statistics so that pruning them wrongly shows up
        g = torch.Generator().manual_seed(1)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
                with torch.no_grad():
                    mod.weight.uniform_(0.5, 1.5, generator=g)
                    mod.bias.uniform_(-0.2, 0.2, generator=g)
        return m.eval()

    return build


def _image(size: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))


ZOO: dict[str, Entry] = {
    e.name: e
    for e in [
        Entry("vgg_bn", _seeded(VGGBN), _image(8)),
        Entry("resnet", _seeded(ResNet), _image(16)),
        Entry("mobilenet_v2", _seeded(MobileNetV2), _image(16)),
        Entry("efficientnet", _seeded(EfficientNet), _image(16)),
        Entry("densenet", _seeded(DenseNet), _image(8)),
        Entry("inception", _seeded(Inception), _image(8)),
        Entry("shufflenet_v2", _seeded(ShuffleNetV2), _image(16)),
        Entry("unet", _seeded(UNet), _image(16)),
        Entry("convnext", _seeded(ConvNeXt), _image(16)),
        Entry("transformer", _seeded(Transformer),
              lambda: torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(2))),
    ]
}
