"""ArcFace-style iresnet face embedder (the layout of insightface's ``recognition/arcface_torch``
backbones, so their ``backbone.pth`` state dicts load with strict key matching).

Input: aligned 112x112 RGB faces in [-1, 1] (arcface_torch normalises with (x/255 - 0.5)/0.5).
Output: a ``num_features``-d embedding (512 for the published models); callers L2-normalise.

Weights come from a local file only. ``load_face_embedder`` returns ``(None, reason)`` when the file
is absent so that a trainer can say so and leave the identity terms out, rather than train
against a random network.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from training import checkpoints

ARCHS = {
    "iresnet18": [2, 2, 2, 2],
    "iresnet34": [3, 4, 6, 3],
    "iresnet50": [3, 4, 14, 3],
    "iresnet100": [3, 13, 30, 3],
    "iresnet200": [6, 26, 60, 6],
}


def conv3x3(i, o, stride=1):
    return nn.Conv2d(i, o, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    fc_scale = 7 * 7

    def __init__(self, layers, num_features: int = 512, widths=(64, 128, 256, 512), dropout: float = 0.0):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-05)
        self.prelu = nn.PReLU(widths[0])
        self.layer1 = self._make_layer(widths[0], layers[0], stride=2)
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-05)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(widths[3] * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=1e-05),
            )
        layers = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.bn2(x)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        x = self.fc(x)
        return self.features(x)


def build_iresnet(arch: str = "iresnet50", num_features: int = 512, widths=None, layers=None) -> IResNet:
    if layers is None:
        if arch not in ARCHS:
            raise ValueError(f"unknown iresnet arch {arch!r}; one of {sorted(ARCHS)}")
        layers = ARCHS[arch]
    return IResNet(layers, num_features=num_features, widths=tuple(widths or (64, 128, 256, 512)))



def load_face_embedder(path: str | Path | None, arch: str = "iresnet50", num_features: int = 512,
                       widths=None, layers=None) -> tuple[IResNet | None, dict]:
    """(frozen eval-mode model, info) or (None, info with the reason). ``.safetensors`` or a torch
    state dict (read with ``weights_only=True``: no pickle code execution)."""
    info = {"arch": arch if layers is None else f"iresnet(layers={list(layers)}, widths={list(widths or [])})",
            "path": str(path) if path else None, "num_features": num_features}
    if not path or not Path(path).is_file():
        info["status"] = "absent"
        info["reason"] = (f"face embedder weights not found at {path}" if path else
                          "no face embedder weights configured (LINEUP_ARCFACE_WEIGHTS)") + ": identity terms disabled"
        return None, info
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    model = build_iresnet(arch, num_features=num_features, widths=widths, layers=layers)
    model.load_state_dict(sd, strict=True)
    model.requires_grad_(False).eval()
    info.update(status="loaded", sha256=checkpoints.file_sha256(path))
    return model, info
