"""ImageNet backbones from torchvision, random or with local pretrained weights.

- `VGG16` (Simonyan & Zisserman, ICLR 2015) and `AlexNet` (Krizhevsky et al. 2012, in
  torchvision's one-GPU variant): `body` is the convolutional features, the adaptive
  average pooling, a flatten and the classifier without its last Linear, so the features
  are the 4096-d fc7 activations (after ReLU, then dropout for VGG), the layer on which
  Piggyback (Mallya et al., ECCV 2018), PackNet (Mallya & Lazebnik, CVPR 2018) and LwF
  (Li & Hoiem, ECCV 2016) put their task heads. The body is one flat `nn.Sequential`, so
  HAT's per-unit gating sees a chain (see models/masked.py, `is_chain`).
- `ResNet50` (He et al., CVPR 2016) and `DenseNet121` (Huang et al., CVPR 2017): the
  globally pooled 2048-d / 1024-d activations. DenseNet's final ReLU (torchvision applies
  it functionally) is a module of `body` here, so `set_last_relu` and MaskedNet see it.

Every backbone follows the shared contract (models/mlp.py): `body`, `head`, `feature_dim`,
`features`, `feature_maps`, `set_last_relu`, `forward = head(features)`.

Weights. `pretrained=imagenet` loads torchvision's IMAGENET1K_V1 weights (the original
ones the papers used; a member name of the architecture's weights enum such as
`IMAGENET1K_V2` picks another) from torch's hub cache, `torch.hub.get_dir()/checkpoints/`
(`$TORCH_HOME/hub/checkpoints`), the file torchvision's `weights=` argument reads; the file
name comes from the enum's URL. `weights=<file>` loads that state dict instead (torchvision's
key names; a `{"state_dict": ...}` wrapper and DataParallel's `module.` prefix are accepted).
Nothing is ever downloaded. A missing file, or a file that is not this architecture's state
dict (other keys, other shapes, truncated, not a state dict, NaN values) is refused in one
`CLBenchError` line naming the file. The ImageNet classifier in the file is ignored: `head`
is always new. `model.pretrained_weights` records what was loaded (the enum's name or the
file; None for a random network) for the strategies that start from a pretrained body.

Inputs that are not ImageNet's:
- one channel (grey digits): the first convolution's RGB filters are summed into one, which
  gives exactly what the RGB network gives on the grey image repeated in R, G and B (the
  mean would scale the first layer's outputs by 1/3 against what the pretrained batch-norm
  statistics and biases expect). Any other channel count gets a new random first layer.
- small images: ResNet-50 and DenseNet-121 take `small_input` like `resnet18` (auto: shorter
  side at most 64 px; the 7x7 stride-2 stem and its max pooling become one 3x3 stride-1
  convolution, random even when pretrained). VGG-16 and AlexNet keep every layer (so all
  pretrained weights apply); a pooling whose window no longer fits the map (VGG's later
  pools below 32 px, AlexNet's below about 63 px) is skipped, and the adaptive pooling
  before the classifier repeats the small map to the 7x7 (6x6) grid fc6 was trained on, as
  torchvision's own forward does for inputs between 32 and 224 px.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from cl_bench import CLBenchError
from cl_bench.models.heads import stage_outputs

PretrainedOption = Union[str, bool, None]


# ------------------------------------------------------------------ weights: where, what, checks


def weights_member(enum_cls, pretrained: PretrainedOption, backbone: str):
    """The torchvision weights enum member that `pretrained` names, or None for random weights."""
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True:
        return enum_cls.IMAGENET1K_V1
    value = str(pretrained).strip()
    if value.lower() in ("none", "false", "no", "off", ""):
        return None
    if value.lower() in ("imagenet", "true", "yes", "on"):
        return enum_cls.IMAGENET1K_V1
    members = [m for m in enum_cls.__members__ if m != "DEFAULT"]
    if value.upper() in enum_cls.__members__:
        return enum_cls[value.upper()]
    raise CLBenchError(f"backbone={backbone}: pretrained must be none or imagenet (or one of {enum_cls.__name__}'s "
                       f"{', '.join(members)}), got {pretrained!r}")


def cache_file(member) -> Path:
    """Where torchvision keeps (and clbench looks for) a weights enum member's file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(member.url).name


def fetch_hint(member, factory_name: str) -> str:
    """The command that puts the file into the hub cache on a machine with internet."""
    return f"`python -c \"import torchvision; torchvision.models.{factory_name}(weights='{member.name}')\"`"


def weights_source(enum_cls, factory_name: str, backbone: str, pretrained: PretrainedOption,
                   weights: Optional[str]) -> Optional[tuple[Path, str]]:
    """(file, label) of the weights to load, or None for a random network; a missing file is refused."""
    member = weights_member(enum_cls, pretrained, backbone)
    if weights is not None and str(weights).strip() not in ("", "null", "None"):
        file = Path(str(weights)).expanduser().absolute()
        if not file.is_file():
            reference = member or enum_cls.IMAGENET1K_V1
            raise CLBenchError(
                f"backbone.weights: {file} {'is a folder' if file.is_dir() else 'does not exist'} (it should be a "
                f"state dict file of torchvision's {factory_name}; "
                f"{fetch_hint(reference, factory_name)} on a machine with internet writes "
                f"{Path(reference.url).name} to its torch hub cache)")
        return file, str(file)
    if member is None:
        return None
    file = cache_file(member)
    if not file.is_file():
        raise CLBenchError(
            f"backbone={backbone} pretrained={member.name}: torchvision's {type(member).__name__}.{member.name} "
            f"weights are not in the torch cache ({file} is missing) and clbench never downloads. On a machine "
            f"with internet run {fetch_hint(member, factory_name)} and copy {file.name} to {file.parent}/ "
            f"(or set TORCH_HOME), or pass backbone.weights=<path to {file.name}>, or use backbone.pretrained=none")
    return file, f"{type(member).__name__}.{member.name}"


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors from `file` (torch.save format, loaded with weights_only)."""
    import pickle

    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise CLBenchError(f"{file} is not a state dict of tensors: it holds pickled Python objects{what}; save "
                           "`model.state_dict()` with torch.save instead of the model or another object") from None
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = lines[0].split(". ")[0][:120] if lines else type(exc).__name__
        raise CLBenchError(f"{file} cannot be read as a torch state dict, truncated or corrupt ({reason}); "
                           "fetch it again") from None
    for wrapper in ("state_dict", "model"):  # training checkpoints that hold the weights under one key
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict) and not torch.is_tensor(obj.get(wrapper)):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and torch.is_tensor(v)
                                                       for k, v in obj.items()):
        kind = type(obj).__name__ if not isinstance(obj, dict) else "dict without tensors" if not obj else \
            "dict whose values are not all tensors"
        raise CLBenchError(f"{file} is not a state dict (it holds a {kind}); save `model.state_dict()` with torch.save")
    if all(k.startswith("module.") for k in obj):  # saved from nn.DataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


# torchvision's families, to name the network a wrong file belongs to
_CANDIDATES = {
    "denseblock": ("densenet121", "densenet161", "densenet169", "densenet201"),
    "layer1.": ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"),
    "features.": ("alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"),
}


def _body_keys(keys) -> set[str]:
    return {k for k in keys if not k.endswith("num_batches_tracked") and not k.startswith(("fc.", "classifier."))}


def which_torchvision_net(keys) -> Optional[str]:
    """The torchvision architecture whose state dict has exactly these keys (classifiers aside), if any."""
    import torchvision

    keys = _body_keys(keys)
    family = next((names for marker, names in _CANDIDATES.items() if any(marker in k for k in keys)), ())
    for name in family:
        with torch.device("meta"):  # no memory, no initialisation: only the key names are needed
            net = getattr(torchvision.models, name)(weights=None)
        if _body_keys(rename_densenet_keys(net.state_dict())) == keys:
            return name
    return None


def _keys(n: int) -> str:
    return f"{n} key{'' if n == 1 else 's'}"


def _listing(keys, n: int = 2) -> str:
    return ", ".join(repr(k) for k in sorted(keys)[:n])


def checked_state_dict(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], file: Path,
                       name: str, head: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """`state` restricted to the body of `reference` (the torchvision network without its classifier
    `head` prefixes), with reference dtypes; any mismatch is one CLBenchError naming `file`."""
    state = {k: v for k, v in state.items() if not k.startswith(head)}  # ImageNet's classifier: replaced by `head`
    optional = {k for k in reference if k.endswith("num_batches_tracked")}  # absent from torchvision's old files
    missing = set(reference) - set(state) - optional
    unexpected = set(state) - set(reference)
    needed = len(reference) - len(optional)
    if missing:
        other = which_torchvision_net(state) if len(missing) > needed // 2 else None
        if other:
            raise CLBenchError(f"{file} does not hold {name} weights: it has the keys of torchvision's {other} "
                               f"({len(missing)} of the {needed} keys {name} needs are missing, such as "
                               f"{_listing(missing)})")
        extra = f"; it has {_keys(len(unexpected))} {name} does not, such as {_listing(unexpected)}" \
            if unexpected else ""
        raise CLBenchError(f"{file} does not hold {name} weights: {_keys(len(missing))} missing, such as "
                           f"{_listing(missing)}{extra}")
    if unexpected:
        raise CLBenchError(f"{file} does not hold {name} weights: it has {_keys(len(unexpected))} {name} does not "
                           f"have, such as {_listing(unexpected)} (weights of a larger network?)")
    wrong = [k for k in state if state[k].shape != reference[k].shape]
    if wrong:
        k = sorted(wrong)[0]
        more = f" (and {len(wrong) - 1} other tensors)" if len(wrong) > 1 else ""
        raise CLBenchError(f"{file} does not hold {name} weights: {k!r} has shape {tuple(state[k].shape)} where "
                           f"{name} has {tuple(reference[k].shape)}{more}")
    out = {}
    for k, ref in reference.items():
        v = state.get(k)
        if v is None:  # a num_batches_tracked the file predates
            v = torch.zeros((), dtype=ref.dtype)
        elif v.is_floating_point():
            if not torch.isfinite(v).all():
                raise CLBenchError(f"{file} does not hold usable {name} weights: {k!r} has NaN or infinite values")
            v = v.to(ref.dtype)
        out[k] = v.contiguous()
    return out


def rename_densenet_keys(state: dict) -> dict:
    """torchvision's DenseNet files predate its module names: `...denselayerN.norm.1.weight` is now
    `...denselayerN.norm1.weight` (same for relu/conv, 1 and 2)."""
    pattern = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")
    return {pattern.sub(r"\1\2.", k): v for k, v in state.items()}


def torchvision_net(factory_name: str, enum_cls, backbone: str, name: str, pretrained: PretrainedOption,
                    weights: Optional[str], strip_head: Callable[[nn.Module], None],
                    head: tuple[str, ...], **kwargs) -> tuple[nn.Module, Optional[str]]:
    """torchvision's `factory_name` network without its ImageNet classifier (`strip_head` removes it; `head`
    are its key prefixes), random or with the weights `pretrained`/`weights` name; and the weights' label."""
    import torchvision

    factory = getattr(torchvision.models, factory_name)
    source = weights_source(enum_cls, factory_name, backbone, pretrained, weights)
    if source is None:
        net = factory(weights=None, **kwargs)
        strip_head(net)
        return net, None
    file, label = source
    with torch.device("meta"):  # skip the random initialisation that the file overwrites (2.7 s for VGG-16)
        net = factory(weights=None, **kwargs)
    strip_head(net)
    state = read_state_dict(file)
    if factory_name.startswith("densenet"):
        state = rename_densenet_keys(state)
    net.load_state_dict(checked_state_dict(state, net.state_dict(), file, name, head), assign=True)
    left = [k for k, t in net.state_dict().items() if t.is_meta]
    if left:
        raise RuntimeError(f"{name}: no value loaded for {left[:3]}")  # a bug here, not the user's file
    return net, label


# ------------------------------------------------------------------ input adaptations


def adapt_first_conv(conv: nn.Conv2d, channels: int) -> nn.Conv2d:
    """The network's first convolution for `channels` input channels (see the module docstring)."""
    if channels == conv.in_channels:
        return conv
    new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None)
    if channels == 1:
        with torch.no_grad():
            new.weight.copy_(conv.weight.sum(1, keepdim=True))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    return new


def _window(value) -> int:
    return value[0] if isinstance(value, tuple) else value


def out_size(layer: nn.Module, size: int) -> int:
    """Output side of a square map of side `size` through a Conv2d / MaxPool2d / AvgPool2d (floor mode)."""
    k, s, p = _window(layer.kernel_size), _window(layer.stride), _window(layer.padding)
    d = _window(getattr(layer, "dilation", 1))
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def fit_pools(layers: list[nn.Module], size: int, backbone: str, shape: tuple) -> tuple[list[nn.Module], int]:
    """`layers` with every pooling that no longer fits the map replaced by nn.Identity; the final side."""
    fitted = []
    for layer in layers:
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            after = out_size(layer, size)
            if after < 1:
                if isinstance(layer, nn.Conv2d):
                    raise CLBenchError(f"backbone={backbone}: images of shape {tuple(shape)} are too small for its "
                                       f"convolution {layer} (map side {size})")
                layer = nn.Identity()
            else:
                size = after
        fitted.append(layer)
    return fitted, size


def _check_image(input_shape: tuple, backbone: str) -> None:
    if len(input_shape) != 3:
        raise CLBenchError(f"backbone={backbone} needs image input (C, H, W), got shape {tuple(input_shape)}")


def small_stem(small_input: str, input_shape: tuple, backbone: str) -> bool:
    """Whether the ImageNet stem becomes a 3x3 stride-1 convolution (auto: shorter side <= 64 px)."""
    mode = str(small_input).lower()
    if mode not in ("auto", "true", "false"):
        raise CLBenchError(f"backbone={backbone}: small_input must be auto, true or false, got {small_input!r}")
    return min(input_shape[1:]) <= 64 if mode == "auto" else mode == "true"


# ------------------------------------------------------------------ ResNet (shared with resnet18)


def _residual_sum(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision BasicBlock/Bottleneck up to its residual sum: its forward without the final ReLU."""
    out = block.relu(block.bn1(block.conv1(x)))
    if hasattr(block, "conv3"):
        out = block.bn3(block.conv3(block.relu(block.bn2(block.conv2(out)))))
    else:
        out = block.bn2(block.conv2(out))
    return out + (x if block.downsample is None else block.downsample(x))


class ResNetBody(nn.Module):
    """torchvision ResNet's layers up to global average pooling, under torchvision's names (so the
    state-dict keys are torchvision's); `last_relu=False` leaves out the last block's final ReLU."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"):
            setattr(self, name, getattr(net, name))
        self.last_relu = True

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        maps = []
        for layer in (self.layer1, self.layer2, self.layer3):
            x = layer(x)
            maps.append(x)
        for i, block in enumerate(self.layer4):
            x = block(x) if self.last_relu or i < len(self.layer4) - 1 else _residual_sum(block, x)
        maps.append(x)
        return [*maps, torch.flatten(self.avgpool(x), 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_maps(x)[-1]


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet as a backbone: `body` (a ResNetBody) and a new linear `head`."""

    def __init__(self, input_shape: tuple, num_outputs: int, factory_name: str, enum_name: str, backbone: str,
                 name: str, small_input: str, pretrained: PretrainedOption, weights: Optional[str]) -> None:
        super().__init__()
        import torchvision

        _check_image(input_shape, backbone)
        small = small_stem(small_input, input_shape, backbone)
        net, self.pretrained_weights = torchvision_net(
            factory_name, getattr(torchvision.models, enum_name), backbone, name, pretrained, weights,
            lambda n: setattr(n, "fc", nn.Identity()), ("fc.",))
        if small:
            net.conv1 = nn.Conv2d(input_shape[0], net.conv1.out_channels, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        else:
            net.conv1 = adapt_first_conv(net.conv1, input_shape[0])
        self.small_input = small
        last = net.layer4[-1]
        self.feature_dim = (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features
        self.body = ResNetBody(net)
        self.head = nn.Linear(self.feature_dim, num_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """layer1..layer4's output maps (B, C, H, W), then features(x) (pooled, B x feature_dim)."""
        return self.body.feature_maps(x)

    def set_last_relu(self, on: bool) -> None:
        self.body.last_relu = on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ResNet50(TorchvisionResNet):
    """torchvision's ResNet-50 (25.6M parameters with ImageNet's classifier; 23.5M in the body)."""

    def __init__(self, input_shape: tuple, num_outputs: int, small_input: str = "auto",
                 pretrained: PretrainedOption = "none", weights: Optional[str] = None) -> None:
        super().__init__(input_shape, num_outputs, "resnet50", "ResNet50_Weights", "resnet50", "ResNet-50",
                         small_input, pretrained, weights)


# ------------------------------------------------------------------ DenseNet-121


class DenseNet121(nn.Module):
    """torchvision's DenseNet-121: `body` = features (dense blocks), ReLU, global pooling, flatten."""

    def __init__(self, input_shape: tuple, num_outputs: int, small_input: str = "auto",
                 pretrained: PretrainedOption = "none", weights: Optional[str] = None) -> None:
        super().__init__()
        from torchvision.models import DenseNet121_Weights

        _check_image(input_shape, "densenet121")
        small = small_stem(small_input, input_shape, "densenet121")
        net, self.pretrained_weights = torchvision_net(
            "densenet121", DenseNet121_Weights, "densenet121", "DenseNet-121", pretrained, weights,
            lambda n: setattr(n, "classifier", nn.Identity()), ("classifier.",))
        features = net.features
        if small:
            features.conv0 = nn.Conv2d(input_shape[0], features.conv0.out_channels, 3, 1, 1, bias=False)
            features.pool0 = nn.Identity()
        else:
            features.conv0 = adapt_first_conv(features.conv0, input_shape[0])
        size = min(input_shape[1:])
        if not small:
            size = out_size(features.pool0, out_size(features.conv0, size))
        for name in ("transition1", "transition2", "transition3"):  # an average pooling below 2 px is skipped
            transition = getattr(features, name)
            transition.pool = fit_pools([transition.pool], size, "densenet121", input_shape)[0][0]
            size = out_size(transition.pool, size) if isinstance(transition.pool, nn.AvgPool2d) else size
        self.small_input = small
        self.feature_dim = features.norm5.num_features
        self.body = nn.Sequential(OrderedDict(
            features=features, relu=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten()))
        names = list(features._modules)
        self._stage_ends = [names.index(n) for n in ("transition1", "transition2", "transition3", "norm5")]
        self.head = nn.Linear(self.feature_dim, num_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The maps after transition1..3 and the final (ReLU'd) map (B, C, H, W), then features(x)."""
        maps, last = stage_outputs(self.body.features, x, self._stage_ends)
        last = self.body.relu(last)
        return [*maps[:-1], last, self.body.flatten(self.body.pool(last))]

    def set_last_relu(self, on: bool) -> None:
        self.body.relu = nn.ReLU() if on else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


# ------------------------------------------------------------------ VGG-16 and AlexNet


class _FlatTorchvisionNet(nn.Module):
    """features + avgpool + flatten + classifier[:-1] of a torchvision VGG/AlexNet as one flat Sequential."""

    def __init__(self, input_shape: tuple, num_outputs: int, factory_name: str, enum_name: str, name: str,
                 pretrained: PretrainedOption, weights: Optional[str], dropout: float) -> None:
        super().__init__()
        import torchvision

        _check_image(input_shape, factory_name)
        if not 0.0 <= dropout < 1.0:
            raise CLBenchError(f"backbone={factory_name}: dropout must be in [0, 1), got {dropout}")
        net, self.pretrained_weights = torchvision_net(
            factory_name, getattr(torchvision.models, enum_name), factory_name, name, pretrained, weights,
            lambda n: setattr(n, "classifier", n.classifier[:-1]), ("classifier.6.",), dropout=dropout)
        features = list(net.features)
        features[0] = adapt_first_conv(features[0], input_shape[0])
        pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
        features, _ = fit_pools(features, min(input_shape[1:]), factory_name, input_shape)
        layers = [*features, net.avgpool, nn.Flatten(), *net.classifier]
        for m in layers:
            if isinstance(m, nn.ReLU):
                m.inplace = False  # stage maps handed out by feature_maps must not change afterwards
        self.body = nn.Sequential(*layers)
        self._stage_ends = pools  # each block ends with a max pooling (kept or skipped)
        self._last_relu = max(i for i, m in enumerate(layers) if isinstance(m, nn.ReLU))
        self.feature_dim = [m for m in net.classifier if isinstance(m, nn.Linear)][-1].out_features  # fc7
        self.head = nn.Linear(self.feature_dim, num_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each convolutional block's output map (B, C, H, W), then features(x) (B x 4096)."""
        maps, out = stage_outputs(self.body, x, self._stage_ends)
        return [*maps, out]

    def set_last_relu(self, on: bool) -> None:
        self.body[self._last_relu] = nn.ReLU() if on else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class VGG16(_FlatTorchvisionNet):
    """torchvision's VGG-16, configuration D (138.4M parameters with ImageNet's classifier; 134.3M in the body)."""

    def __init__(self, input_shape: tuple, num_outputs: int, pretrained: PretrainedOption = "none",
                 weights: Optional[str] = None, dropout: float = 0.5) -> None:
        super().__init__(input_shape, num_outputs, "vgg16", "VGG16_Weights", "VGG-16", pretrained, weights, dropout)


class AlexNet(_FlatTorchvisionNet):
    """torchvision's AlexNet (61.1M parameters with ImageNet's classifier; 57.0M in the body)."""

    def __init__(self, input_shape: tuple, num_outputs: int, pretrained: PretrainedOption = "none",
                 weights: Optional[str] = None, dropout: float = 0.5) -> None:
        super().__init__(input_shape, num_outputs, "alexnet", "AlexNet_Weights", "AlexNet", pretrained, weights,
                         dropout)
