"""Turn a 2D network into a volumetric one: 2.5D, 3D (inflated) or ACS convolutions.

The MedMNIST v2 reference experiments build their 3D baselines by writing a 2D ResNet and converting its
layers. `convert_2d_to_3d(model, mode)` does the same in place on any module tree:

* `Conv2d`                                  -> `Conv3d` (`"2.5d"`, `"3d"`) or `ACSConv` (`"acs"`),
* `BatchNorm2d` / `InstanceNorm2d`          -> their 3D forms (parameters and running statistics copied),
* `MaxPool2d`, `AvgPool2d`, `AdaptiveAvgPool2d`, `AdaptiveMaxPool2d`, `Dropout2d` -> their 3D forms,

and every other module (e.g. the linear head) is left as it is. The 2D weights carry over through
`inflate_weight`:

* `"2.5d"`: a k x k kernel becomes 1 x k x k (`w.unsqueeze(2)`): the 2D convolution is applied to every
  slice with shared weights. Strides, like in the reference, apply to all three axes (depth included).
* `"3d"`: a k x k kernel becomes k x k x k by repeating it k times along depth and dividing by k (I3D
  inflation), so that a depth-constant volume gives the 2D response on every slice.
* `"acs"`: the 2D kernel is kept as the parameter; its output channels are split into three near-equal
  groups (remainder to the first groups: 64 -> 22, 21, 21) convolved with 1 x k x k (axial), k x 1 x k
  (coronal) and k x k x 1 (sagittal) kernels, and the three outputs are concatenated (Yang et al., "Reinventing
  2D Convolutions for 3D Images", 2021). It has the parameter count of the 2D network.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODES", "acs_split", "acs_kernels", "inflate_weight", "ACSConv", "convert_conv2d", "convert_2d_to_3d"]

MODES = ("2.5d", "3d", "acs")


def _pair(value) -> tuple:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"expected a 2D size, got {value!r}")
        return tuple(value)
    return (value, value)


def acs_split(channels: int) -> tuple[int, int, int]:
    """Output channels of the axial, coronal and sagittal groups: near-equal, the remainder to the first ones."""
    if channels < 0:
        raise ValueError(f"channels must be >= 0, got {channels}")
    base, rest = divmod(channels, 3)
    return tuple(base + (1 if i < rest else 0) for i in range(3))  # type: ignore[return-value]


def acs_kernels(weight2d: torch.Tensor) -> list[torch.Tensor]:
    """The three 3D kernels of an ACS convolution: (a, in, 1, kh, kw), (c, in, kh, 1, kw), (s, in, kh, kw, 1)."""
    a, c, s = acs_split(weight2d.shape[0])
    wa, wc, ws = torch.split(weight2d, [a, c, s], dim=0)
    return [wa.unsqueeze(2), wc.unsqueeze(3), ws.unsqueeze(4)]


def inflate_weight(weight2d: torch.Tensor, mode: str) -> torch.Tensor:
    """The 3D weight that `mode` derives from a 2D conv weight (out, in, kh, kw).

    `"2.5d"`: (out, in, 1, kh, kw); `"3d"`: (out, in, k, kh, kw) with k = kh, the 2D kernel repeated k times
    along depth and divided by k; `"acs"`: the 2D weight itself (the ACS module keeps it; see `acs_kernels`).
    """
    if weight2d.dim() != 4:
        raise ValueError(f"expected a 2D conv weight (out, in, kh, kw), got shape {tuple(weight2d.shape)}")
    if mode == "2.5d":
        return weight2d.unsqueeze(2).clone()
    if mode == "3d":
        depth = weight2d.shape[2]
        return weight2d.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth
    if mode == "acs":
        return weight2d.clone()
    raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")


class ACSConv(nn.Module):
    """Axial-coronal-sagittal convolution: a 2D kernel (out, in, kh, kw) applied along three planes.

    The output channels are split by `acs_split`; group 0 convolves with the kernel in the H-W plane
    (1 x kh x kw), group 1 in the D-W plane (kh x 1 x kw), group 2 in the D-H plane (kh x kw x 1). Stride and
    dilation apply to all three axes; the 2D padding goes to the two axes the kernel spans (0 on the third).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if groups != 1:
            raise NotImplementedError("ACSConv supports groups=1 only")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        if self.stride[0] != self.stride[1]:
            raise ValueError(f"ACSConv needs an isotropic stride, got {stride!r}")
        self.dilation = _pair(dilation)
        if self.dilation[0] != self.dilation[1]:
            raise ValueError(f"ACSConv needs an isotropic dilation, got {dilation!r}")
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.split = acs_split(out_channels)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        # the default of nn.Conv2d (the converter overwrites it with the 2D weights)
        tmp = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(tmp.weight)
            if self.bias is not None:
                self.bias.copy_(tmp.bias)

    def _plane_padding(self, plane: int):
        if isinstance(self.padding, str):
            return self.padding
        ph, pw = self.padding
        return [(0, ph, pw), (ph, 0, pw), (ph, pw, 0)][plane]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"ACSConv expects (B, C, D, H, W), got shape {tuple(x.shape)}")
        stride, dilation = self.stride[0], self.dilation[0]
        if self.kernel_size == (1, 1):  # all three planes coincide: one 1 x 1 x 1 convolution
            return F.conv3d(x, self.weight[:, :, None], self.bias, stride, self._plane_padding(0), dilation)
        biases = torch.split(self.bias, self.split) if self.bias is not None else (None, None, None)
        outs = [F.conv3d(x, kernel, b, stride, self._plane_padding(plane), dilation)
                for plane, (kernel, b, n) in enumerate(zip(acs_kernels(self.weight), biases, self.split)) if n > 0]
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, split={self.split}, bias={self.bias is not None}")


def convert_conv2d(conv: nn.Conv2d, mode: str) -> nn.Module:
    """A volumetric convolution whose weights are inflated from `conv` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    padding = conv.padding
    factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    bias = conv.bias is not None
    if mode == "acs":
        if conv.padding_mode != "zeros":
            raise NotImplementedError("ACSConv supports padding_mode='zeros' only")
        new = ACSConv(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                      conv.groups, bias, **factory)
    else:
        if sh != sw or dh != dw:
            raise ValueError("converting a Conv2d needs an isotropic stride and dilation")
        if mode == "3d":
            if kh != kw:
                raise ValueError(f"3D inflation needs a square kernel, got {conv.kernel_size}")
            kernel = (kh, kh, kw)
            pad = padding if isinstance(padding, str) else (padding[0], *padding)
            dilation = (dh, dh, dw)
        else:  # 2.5d
            kernel = (1, kh, kw)
            pad = padding if isinstance(padding, str) else (0, *padding)
            dilation = (1, dh, dw)
        new = nn.Conv3d(conv.in_channels, conv.out_channels, kernel, (sh, sh, sw), pad, dilation, conv.groups,
                        bias, conv.padding_mode, **factory)
    with torch.no_grad():
        new.weight.copy_(inflate_weight(conv.weight.detach(), mode))
        if bias:
            new.bias.copy_(conv.bias.detach())
    new.train(conv.training)
    return new


def _convert_norm(norm: nn.Module, cls: type) -> nn.Module:
    new = cls(norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
              track_running_stats=norm.track_running_stats, device=_device_of(norm), dtype=_dtype_of(norm))
    new.load_state_dict(norm.state_dict())
    new.train(norm.training)
    return new


def _device_of(module: nn.Module):
    t = next(iter(module.state_dict().values()), None)
    return t.device if t is not None else None


def _dtype_of(module: nn.Module):
    for t in module.state_dict().values():
        if t.is_floating_point():
            return t.dtype
    return None


def _triple_like(value, depth_value=None) -> tuple:
    """(d, h, w) from a 2D pooling size; the depth takes `depth_value` or the height's value."""
    h, w = _pair(value)
    return (h if depth_value is None else depth_value, h, w)


def _convert_pool(pool: nn.Module) -> nn.Module:
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        return nn.AdaptiveAvgPool3d(_triple_like(pool.output_size))
    if isinstance(pool, nn.AdaptiveMaxPool2d):
        return nn.AdaptiveMaxPool3d(_triple_like(pool.output_size), return_indices=pool.return_indices)
    # pooling becomes isotropic in every mode (as in the reference converters)
    if isinstance(pool, nn.MaxPool2d):
        return nn.MaxPool3d(_triple_like(pool.kernel_size), _triple_like(pool.stride),
                            _triple_like(pool.padding), _triple_like(pool.dilation), pool.return_indices,
                            pool.ceil_mode)
    if isinstance(pool, nn.AvgPool2d):
        return nn.AvgPool3d(_triple_like(pool.kernel_size), _triple_like(pool.stride), _triple_like(pool.padding),
                            pool.ceil_mode, pool.count_include_pad, pool.divisor_override)
    raise TypeError(f"no 3D form for {type(pool).__name__}")


_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool2d, nn.AvgPool2d)
_NORMS = {nn.BatchNorm2d: nn.BatchNorm3d, nn.InstanceNorm2d: nn.InstanceNorm3d}


def _convert_leaf(module: nn.Module, mode: str) -> nn.Module | None:
    if isinstance(module, nn.Conv2d):
        return convert_conv2d(module, mode)
    for cls2d, cls3d in _NORMS.items():
        if type(module) is cls2d:
            return _convert_norm(module, cls3d)
    if isinstance(module, _POOLS):
        return _convert_pool(module)
    if type(module) is nn.Dropout2d:
        return nn.Dropout3d(module.p, module.inplace)
    return None


def convert_2d_to_3d(model: nn.Module, mode: str, *, skip: Sequence[type] = ()) -> nn.Module:
    """Convert the 2D layers of `model` (in place) to their `mode` volumetric forms; returns the model.

    Modules whose type is in `skip` are left untouched together with their children. A bare 2D layer passed
    as `model` is returned converted (a new module).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    converted = _convert_leaf(model, mode)
    if converted is not None:
        return converted
    for name, child in model.named_children():
        if skip and isinstance(child, tuple(skip)):
            continue
        new = _convert_leaf(child, mode)
        if new is not None:
            setattr(model, name, new)
        else:
            convert_2d_to_3d(child, mode, skip=skip)
    return model
