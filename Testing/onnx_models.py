"""The tests' one helpers module: small analytic ONNX models with known answers (built with onnx.helper),
shared constants and array helpers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
#: An asymmetric 3x3 kernel: a convolution with it tells rows from columns and flips from none.
KERNEL = np.array([[0.0, 1.0, 0.5], [2.0, -1.0, 0.0], [0.25, 0.0, 3.0]], np.float32)
#: A 3x3 kernel with non-negative weights (outputs stay non-negative on non-negative images).
POSITIVE_KERNEL = np.array([[0.0, 1.0, 0.0], [1.0, 4.0, 2.0], [0.0, 0.5, 0.0]], np.float32)

#: Cards valid for the 2D identity test model (input "x", output "y", one channel, NCHW).
IDENTITY_CARDS = [
    {},
    {"ibix_card": 1, "name": "identity", "spatial_dims": 2, "slice_axis": "axial",
     "input": {"name": "x", "layout": "NCHW", "channels": ["T1"],
               "intensity": {"from": [0.0, 1.0], "to": [0.0, 1.0], "clip": False}},
     "output": {"name": "y", "layout": "NCHW", "channels": ["T2"],
                "intensity": {"from": [0.0, 1.0], "to": [0.0, 1.0]}, "units": "a.u."}},
    {"spatial_dims": 2, "slice_axis": "sagittal", "in_plane": {"transpose": True, "flip_rows": True},
     "input": {"channels": ["T1"], "multiple_of": 4,
               "intensity": {"percentiles": [1, 99], "to": [-1, 1], "clip": True}}},
    {"input": {"size": [32, 32]}, "output": {"units": "HU", "intensity": {"from": [-1, 1], "to": [-1000, 2000]}},
     "training": {"data": "none"}, "metrics": {"mae": 1.0}, "license": "BSD", "authors": ["a", "b"]},
]


def box_mask(shape: Sequence[int], *slices: slice) -> np.ndarray:
    """A boolean array of ``shape`` that is True on the box ``slices``."""
    mask = np.zeros(shape, bool)
    mask[slices] = True
    return mask


def _shape(layout: str, channels: int, batch, spatial: Sequence) -> list:
    spatial = list(spatial)
    return [batch, channels] + spatial if layout[1] == "C" else [batch] + spatial + [channels]


def _initializer(value) -> np.ndarray:
    """float32, except integer arrays (indices, axes), which keep int64, and booleans."""
    value = np.asarray(value)
    if value.dtype.kind == "b":
        return value
    return value.astype(np.int64) if value.dtype.kind in "iu" else value.astype(np.float32)


def build(nodes: list, initializers: dict, layout: str = "NCHW", in_channels: int = 1, out_channels: int = 1,
          batch="N", spatial: Sequence | None = None, input_name: str = "x", output_name: str = "y") -> onnx.ModelProto:
    """A model whose core ``nodes`` map 'core_in' (NC...) to 'core_out' (NC...); transposes are added for
    channels-last layouts."""
    dims = len(layout) - 2
    spatial = spatial or [f"s{i}" for i in range(dims)]
    channels_last = layout[-1] == "C"
    pre, post = [], []
    if channels_last:
        to_first = [0, dims + 1] + list(range(1, dims + 1))
        to_last = [0] + list(range(2, dims + 2)) + [1]
        pre = [helper.make_node("Transpose", [input_name], ["core_in"], perm=to_first)]
        post = [helper.make_node("Transpose", ["core_out"], [output_name], perm=to_last)]
    else:
        pre = [helper.make_node("Identity", [input_name], ["core_in"])]
        post = [helper.make_node("Identity", ["core_out"], [output_name])]
    graph = helper.make_graph(
        pre + nodes + post, "ibix_test",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, _shape(layout, in_channels, batch, spatial))],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, _shape(layout, out_channels, batch, spatial))],
        [numpy_helper.from_array(_initializer(v), k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def identity(layout: str = "NCHW", **kw) -> onnx.ModelProto:
    return build([helper.make_node("Identity", ["core_in"], ["core_out"])], {}, layout, **kw)


def convolution(kernel: np.ndarray, layout: str = "NCHW", **kw) -> onnx.ModelProto:
    """Zero-padded 'same' cross-correlation with one kernel (2D or 3D), one channel in and out."""
    kernel = np.asarray(kernel, np.float32)
    pads = [k // 2 for k in kernel.shape] * 2
    node = helper.make_node("Conv", ["core_in", "w"], ["core_out"], pads=pads)
    return build([node], {"w": kernel[None, None]}, layout, **kw)


def box_blur(widths: Sequence[int], layout: str = "NCHW", **kw) -> onnx.ModelProto:
    """A box blur: the mean over a centred box of ``widths`` voxels (odd, one per spatial axis), zero-padded.

    Its response to a jittered region spreads exactly (widths - 1) / 2 voxels along each axis."""
    return convolution(np.full(tuple(widths), 1.0 / float(np.prod(widths)), np.float32), layout, **kw)


def polynomial(a: float, b: float, layout: str = "NCHW", **kw) -> onnx.ModelProto:
    """f(x) = a x^2 + b x, voxel by voxel."""
    nodes = [helper.make_node("Mul", ["core_in", "core_in"], ["sq"]),
             helper.make_node("Mul", ["sq", "a"], ["asq"]),
             helper.make_node("Mul", ["core_in", "b"], ["bx"]),
             helper.make_node("Add", ["asq", "bx"], ["core_out"])]
    return build(nodes, {"a": np.float32(a), "b": np.float32(b)}, layout, **kw)


def channel_mix(weights: Sequence[float], layout: str = "NCHW", **kw) -> onnx.ModelProto:
    """y = sum_c w_c x_c (a 1x1 convolution from len(weights) channels to one)."""
    w = np.asarray(weights, np.float32).reshape(1, -1, 1, 1)
    node = helper.make_node("Conv", ["core_in", "w"], ["core_out"])
    return build([node], {"w": w}, layout, in_channels=len(weights), **kw)


def affine_then(model_nodes: list, initializers: dict, scale: float, offset: float, out_scale: float,
                out_offset: float, **kw) -> onnx.ModelProto:
    """(scale * x + offset) -> nodes -> out_scale * y + out_offset, with the nodes reading 'z_in' and writing
    'z_out'."""
    nodes = [helper.make_node("Mul", ["core_in", "s_in"], ["si"]),
             helper.make_node("Add", ["si", "o_in"], ["z_in"])] + model_nodes + [
             helper.make_node("Mul", ["z_out", "s_out"], ["so"]),
             helper.make_node("Add", ["so", "o_out"], ["core_out"])]
    initializers = dict(initializers, s_in=np.float32(scale), o_in=np.float32(offset),
                        s_out=np.float32(out_scale), o_out=np.float32(out_offset))
    return build(nodes, initializers, **kw)


def nan_above(threshold: float, layout: str = "NCHW", **kw) -> onnx.ModelProto:
    """Identity, except that it emits NaN wherever the input exceeds ``threshold`` (sqrt of a negative)."""
    nodes = [helper.make_node("Sub", ["t", "core_in"], ["d"]),
             helper.make_node("Sqrt", ["d"], ["r"]),
             helper.make_node("Mul", ["r", "zero"], ["rz"]),
             helper.make_node("Add", ["core_in", "rz"], ["core_out"])]
    return build(nodes, {"t": np.float32(threshold), "zero": np.float32(0.0)}, layout, **kw)


def save(model: onnx.ModelProto, folder: Path, name: str, card: dict | None = None) -> Path:
    """Write the model (and its card beside it, as ``<name>.json``)."""
    path = Path(folder) / f"{name}.onnx"
    onnx.save(model, str(path))
    if card is not None:
        path.with_suffix(".json").write_text(json.dumps(card))
    return path


def correlate(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Zero-padded 'same' cross-correlation, the oracle for :func:`convolution`."""
    from scipy import ndimage
    return ndimage.correlate(image.astype(np.float64), kernel.astype(np.float64), mode="constant", cval=0.0)


def small_autoencoder(seed: int = 0, layout: str = "NCHW", **kw) -> onnx.ModelProto:
    """A nonlinear convolutional encoder-decoder (conv, ReLU, max-pooling, upsampling) with random weights:
    a finite receptive field like the demo generators, so its response is local but not linear."""
    rng = np.random.default_rng(seed)
    w1, w2, w3 = (rng.normal(0, 0.5, s).astype(np.float32) for s in [(4, 1, 3, 3), (4, 4, 3, 3), (1, 4, 3, 3)])
    bias = rng.normal(0, 0.1, 4).astype(np.float32)
    nodes = [helper.make_node("Conv", ["core_in", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Resize", ["r2", "", "scales"], ["u2"], mode="nearest"),
             helper.make_node("Conv", ["u2", "w3"], ["core_out"], pads=[1, 1, 1, 1])]
    initializers = {"w1": w1, "b1": bias, "w2": w2, "w3": w3, "scales": np.array([1, 1, 2, 2], np.float32)}
    return build(nodes, initializers, layout, **kw)


def small_autoencoder_3d(seed: int = 7) -> onnx.ModelProto:
    """A 3D convolutional encoder-decoder (conv, ReLU, 2x max-pooling, conv, upsampling, conv) with random weights:
    stride 2, a receptive field of about +-7 voxels."""
    rng = np.random.default_rng(seed)
    shapes = {"w1": (8, 1, 3, 3, 3), "w2": (8, 8, 3, 3, 3), "w3": (1, 8, 3, 3, 3)}
    weights = {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in shapes.items()}
    nodes = [helper.make_node("Conv", ["core_in", "w1"], ["c1"], pads=[1] * 6),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2] * 3, strides=[2] * 3),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1] * 6),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Resize", ["r2", "", "scales"], ["u2"], mode="nearest"),
             helper.make_node("Conv", ["u2", "w3"], ["core_out"], pads=[1] * 6)]
    return build(nodes, {**weights, "scales": np.array([1, 1, 2, 2, 2], np.float32)}, "NCDHW")


def convolution_plus_mean(kernel: np.ndarray, weight: float, **kw) -> onnx.ModelProto:
    """A 2D convolution plus ``weight`` times the image mean: a local response with a small global part."""
    kernel = np.asarray(kernel, np.float32)
    nodes = [helper.make_node("Conv", ["core_in", "w"], ["c"], pads=[k // 2 for k in kernel.shape] * 2),
             helper.make_node("ReduceMean", ["core_in"], ["m"], axes=[2, 3], keepdims=1),
             helper.make_node("Mul", ["m", "g"], ["gm"]),
             helper.make_node("Add", ["c", "gm"], ["core_out"])]
    return build(nodes, {"w": kernel[None, None], "g": np.float32(weight)}, **kw)


def batch_mixing(reduce: str = "ReduceMean", weight: float = 1.0, layout: str = "NCHW", **kw) -> onnx.ModelProto:
    """y = x + weight * reduce(x over the batch axis): each sample's output depends on the other samples of the
    batch, as a network exported with batch statistics does. One sample alone: reduce(x) = x (for a mean, max, min)."""
    nodes = [helper.make_node(reduce, ["core_in"], ["m"], axes=[0], keepdims=1),
             helper.make_node("Mul", ["m", "g"], ["gm"]),
             helper.make_node("Add", ["core_in", "gm"], ["core_out"])]
    return build(nodes, {"g": np.float32(weight)}, layout, **kw)


# -- common generator architectures, small and with random weights (the work of IBIX against brute force) ----------
# A BatchNorm U-Net whose reach (51 pixels) is near the size of a 256-pixel image; encoder-decoders with
# InstanceNorm, GroupNorm or squeeze-excitation (a global response: a normalisation or a gate over the whole image);
# pix2pix's U-Net-256 (eight stride-2 convolutions down to a 1x1 bottleneck, a fixed 256x256 input of 3 channels, the
# architecture of the method paper's MRI->CT example); ResNet generators (CycleGAN's, InstanceNorm and reflection
# padding; pix2pix's ResNet option with BatchNorm). Model work does not depend on the weights.

class GeneratorBuilder:
    """A small builder: each method adds nodes and returns the name of its output tensor (N, C, H, W)."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.initializers: list = []
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def constant(self, value: np.ndarray, stem: str = "w") -> str:
        name = self.name(stem)
        value = np.asarray(value)
        value = value.astype(np.int64) if value.dtype.kind in "iu" else value.astype(np.float32)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], **attributes) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attributes))
        return out

    def conv(self, x: str, cin: int, cout: int, kernel: int, stride: int = 1, pad: int | None = None) -> str:
        pad = kernel // 2 if pad is None else pad
        w = self.rng.normal(0, np.sqrt(2.0 / (cin * kernel * kernel)), (cout, cin, kernel, kernel))
        b = self.rng.normal(0, 0.05, cout)
        return self.node("Conv", [x, self.constant(w), self.constant(b, "b")], kernel_shape=[kernel, kernel],
                         strides=[stride, stride], pads=[pad] * 4)

    def conv_transpose(self, x: str, cin: int, cout: int, kernel: int, stride: int, pad: int,
                       output_padding: int = 0) -> str:
        w = self.rng.normal(0, np.sqrt(1.0 / (cin * kernel * kernel)), (cin, cout, kernel, kernel))
        b = self.rng.normal(0, 0.05, cout)
        return self.node("ConvTranspose", [x, self.constant(w), self.constant(b, "b")],
                         kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4,
                         output_padding=[output_padding] * 2)

    def batch_norm(self, x: str, channels: int) -> str:
        """Inference-mode BatchNorm (running statistics): a per-channel affine map, local."""
        scale, bias = self.rng.uniform(0.5, 1.5, channels), self.rng.normal(0, 0.1, channels)
        mean, var = self.rng.normal(0, 0.1, channels), self.rng.uniform(0.5, 1.5, channels)
        return self.node("BatchNormalization", [x] + [self.constant(v, "bn") for v in (scale, bias, mean, var)])

    def instance_norm(self, x: str, channels: int) -> str:
        scale, bias = self.rng.uniform(0.5, 1.5, channels), self.rng.normal(0, 0.1, channels)
        return self.node("InstanceNormalization", [x, self.constant(scale, "in"), self.constant(bias, "in")])

    def group_norm(self, x: str, channels: int, groups: int) -> str:
        """GroupNorm as PyTorch exports it: reshape to (N, G, -1), InstanceNormalization, reshape back, affine."""
        grouped = self.node("Reshape", [x, self.constant(np.array([0, groups, -1]), "shape")])
        normed = self.node("InstanceNormalization", [grouped, self.constant(np.ones(groups), "gn"),
                                                     self.constant(np.zeros(groups), "gn")])
        shape = self.node("Shape", [x])
        back = self.node("Reshape", [normed, shape])
        gamma = self.constant(self.rng.uniform(0.5, 1.5, (1, channels, 1, 1)), "gn")
        beta = self.constant(self.rng.normal(0, 0.1, (1, channels, 1, 1)), "gn")
        return self.node("Add", [self.node("Mul", [back, gamma]), beta])

    def squeeze_excitation(self, x: str, channels: int, reduction: int = 4) -> str:
        """x * sigmoid(W2 relu(W1 mean(x))): a per-channel gate from the mean over the whole image."""
        pooled = self.node("GlobalAveragePool", [x])
        hidden = self.relu(self.conv(pooled, channels, max(1, channels // reduction), 1))
        gate = self.node("Sigmoid", [self.conv(hidden, max(1, channels // reduction), channels, 1)])
        return self.node("Mul", [x, gate])

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def leaky_relu(self, x: str, alpha: float = 0.2) -> str:
        return self.node("LeakyRelu", [x], alpha=alpha)

    def max_pool(self, x: str) -> str:
        return self.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])

    def upsample(self, x: str) -> str:
        return self.node("Resize", [x, "", self.constant(np.array([1.0, 1.0, 2.0, 2.0]), "scales")], mode="nearest")

    def reflect_pad(self, x: str, pad: int) -> str:
        return self.node("Pad", [x, self.constant(np.array([0, 0, pad, pad, 0, 0, pad, pad]), "pads")],
                         mode="reflect")

    def concat(self, *xs: str) -> str:
        return self.node("Concat", list(xs), axis=1)

    def model(self, x_in: str, out: str, in_channels: int, out_channels: int,
              spatial: tuple | None = None) -> onnx.ModelProto:
        spatial = list(spatial) if spatial else ["H", "W"]
        self.nodes.append(helper.make_node("Identity", [out], ["y"]))
        graph = helper.make_graph(
            self.nodes, "generator",
            [helper.make_tensor_value_info(x_in, TensorProto.FLOAT, ["N", in_channels] + spatial)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_channels] + spatial)],
            self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def _double_conv(g: GeneratorBuilder, x: str, cin: int, cout: int, norm: str, groups: int = 4) -> str:
    for c in (cin, cout):
        x = g.conv(x, c, cout, 3)
        if norm == "batch":
            x = g.batch_norm(x, cout)
        elif norm == "instance":
            x = g.instance_norm(x, cout)
        elif norm == "group":
            x = g.group_norm(x, cout, groups)
        x = g.relu(x)
    if norm == "se":
        x = g.squeeze_excitation(x, cout)
    return x


def unet(norm: str = "batch", widths: tuple[int, ...] = (8, 16, 32, 64), seed: int = 0) -> onnx.ModelProto:
    """A U-Net: double 3x3 convolutions (with ``norm``: "batch", "instance", "group", "se" or "none") and max
    pooling on the way down, nearest upsampling and skip connections on the way up, a 1x1 output convolution.
    With four widths (three poolings) its receptive field reaches 51 pixels; stride 8."""
    g = GeneratorBuilder(seed)
    x, skips, cin = "x", [], 1
    for width in widths[:-1]:
        x = _double_conv(g, x, cin, width, norm)
        skips.append((x, width))
        x, cin = g.max_pool(x), width
    x = _double_conv(g, x, cin, widths[-1], norm)
    cin = widths[-1]
    for skip, width in reversed(skips):
        x = _double_conv(g, g.concat(g.upsample(x), skip), cin + width, width, norm)
        cin = width
    return g.model("x", g.conv(x, cin, 1, 1), 1, 1)


def pix2pix_unet256(ngf: int = 4, in_channels: int = 3, seed: int = 1) -> onnx.ModelProto:
    """pix2pix's U-Net-256: eight 4x4 stride-2 convolutions (BatchNorm, LeakyReLU 0.2) from 256x256 down to a 1x1
    bottleneck, eight 4x4 stride-2 transposed convolutions (BatchNorm, ReLU) back up with skip connections, Tanh.
    A fixed input of 256x256 pixels and ``in_channels`` channels."""
    g = GeneratorBuilder(seed)
    widths = [ngf, 2 * ngf, 4 * ngf] + [8 * ngf] * 5
    x, cin, skips = "x", in_channels, []
    for i, width in enumerate(widths):
        x = g.conv(g.leaky_relu(x) if i else x, cin, width, 4, stride=2, pad=1)
        if 0 < i < len(widths) - 1:
            x = g.batch_norm(x, width)
        skips.append((x, width))
        cin = width
    skips.pop()
    for skip, width in reversed(skips):
        x = g.batch_norm(g.conv_transpose(g.relu(x), cin, width, 4, 2, 1), width)
        x, cin = g.concat(x, skip), 2 * width
    out = g.node("Tanh", [g.conv_transpose(g.relu(x), cin, 1, 4, 2, 1)])
    return g.model("x", out, in_channels, 1, (256, 256))


def resnet_generator(norm: str = "instance", n_blocks: int = 6, ngf: int = 8, seed: int = 2) -> onnx.ModelProto:
    """The ResNet generator of CycleGAN and pix2pix: reflection-padded 7x7 convolution, two stride-2 convolutions,
    ``n_blocks`` residual blocks, two stride-2 transposed convolutions, a 7x7 convolution and Tanh; ``norm``
    "instance" (CycleGAN) or "batch" (pix2pix's ResNet option). Stride 4."""
    g = GeneratorBuilder(seed)
    normalize = (lambda t, c: g.instance_norm(t, c)) if norm == "instance" else (lambda t, c: g.batch_norm(t, c))
    x = g.relu(normalize(g.conv(g.reflect_pad("x", 3), 1, ngf, 7, pad=0), ngf))
    cin = ngf
    for _ in range(2):
        x = g.relu(normalize(g.conv(x, cin, 2 * cin, 3, stride=2, pad=1), 2 * cin))
        cin *= 2
    for _ in range(n_blocks):
        y = g.relu(normalize(g.conv(g.reflect_pad(x, 1), cin, cin, 3, pad=0), cin))
        y = normalize(g.conv(g.reflect_pad(y, 1), cin, cin, 3, pad=0), cin)
        x = g.node("Add", [x, y])
    for _ in range(2):
        x = g.relu(normalize(g.conv_transpose(x, cin, cin // 2, 3, 2, 1, output_padding=1), cin // 2))
        cin //= 2
    out = g.node("Tanh", [g.conv(g.reflect_pad(x, 3), cin, 1, 7, pad=0)])
    return g.model("x", out, 1, 1)


#: name -> (builder, card, what it is): the generators of the acceptance cases.
GENERATORS = {
    "bn_unet": (lambda: unet("batch"), {"input": {"multiple_of": 8}},
                "BatchNorm U-Net, 3 poolings (reach 51 px)"),
    "in_unet": (lambda: unet("instance"), {"input": {"multiple_of": 8}}, "InstanceNorm U-Net"),
    "gn_unet": (lambda: unet("group"), {"input": {"multiple_of": 8}}, "GroupNorm U-Net"),
    "se_unet": (lambda: unet("se"), {"input": {"multiple_of": 8}}, "squeeze-excitation U-Net"),
    "pix2pix_unet256": (pix2pix_unet256, {"input": {"size": [256, 256], "channels": ["water", "fat", "in_phase"]}},
                        "pix2pix U-Net-256 (1x1 bottleneck, fixed 256x256, 3 channels)"),
    "resnet_in": (lambda: resnet_generator("instance"), {"input": {"multiple_of": 4}},
                  "ResNet generator, 6 blocks, InstanceNorm (CycleGAN)"),
    "resnet_bn": (lambda: resnet_generator("batch", 9), {"input": {"multiple_of": 4}},
                  "ResNet generator, 9 blocks, BatchNorm (pix2pix)"),
}


def save_generator(name: str, folder: Path) -> Path:
    """Build generator ``name`` and write it with its card (2D, NCHW, input "x", output "y") into ``folder``."""
    builder, card, _ = GENERATORS[name]
    card = json.loads(json.dumps(card))
    card.setdefault("input", {}).update({"name": "x", "layout": "NCHW"})
    card["input"].setdefault("channels", ["image"])
    card.update({"spatial_dims": 2, "output": {"name": "y", "layout": "NCHW", "channels": ["synthetic"]}})
    return save(builder(), folder, name, card)


#: Kinds of :func:`noisy` models; those in NOISY_DETERMINISTIC are deterministic after all.
NOISY_KINDS = ("dropout", "dropout-eval", "dropout-no-flag", "normal", "normal-seeded", "uniform", "bernoulli",
               "scalar", "conv-then-dropout")
NOISY_DETERMINISTIC = ("dropout-eval", "dropout-no-flag")


def noisy(kind: str, scale: float = 1.0, **kw) -> onnx.ModelProto:
    """y = x with randomness as exports leave it: Dropout in training mode (``dropout``; ``dropout-eval``: training
    mode off, ``dropout-no-flag``: no training input, both the identity), x + scale * RandomNormalLike(x)
    (``normal``; ``normal-seeded`` with a fixed seed), x + scale * (RandomUniformLike(x) - 0.5) (``uniform``),
    x * Bernoulli(sigmoid(x)) (``bernoulli``), x + scale * RandomNormal([1]) (``scalar``: one number per model
    call), a convolution then Dropout (``conv-then-dropout``)."""
    node = helper.make_node
    constants: dict = {"scale": np.float32(scale), "half": np.float32(0.5), "ratio": np.float32(0.5)}
    if kind.startswith("dropout") or kind == "conv-then-dropout":
        source = "core_in"
        nodes = []
        if kind == "conv-then-dropout":
            nodes.append(node("Conv", ["core_in", "w"], ["c"], pads=[1, 1, 1, 1]))
            constants["w"] = POSITIVE_KERNEL[None, None]
            source = "c"
        flag = [] if kind == "dropout-no-flag" else ["training"]
        nodes.append(node("Dropout", [source, "ratio"] + flag, ["core_out"]))
        constants["training"] = np.array(kind != "dropout-eval")
    elif kind in ("normal", "normal-seeded"):
        seed = {"seed": 7.0} if kind == "normal-seeded" else {}
        nodes = [node("RandomNormalLike", ["core_in"], ["r"], **seed), node("Mul", ["r", "scale"], ["n"]),
                 node("Add", ["core_in", "n"], ["core_out"])]
    elif kind == "uniform":
        nodes = [node("RandomUniformLike", ["core_in"], ["r"]), node("Sub", ["r", "half"], ["c"]),
                 node("Mul", ["c", "scale"], ["n"]), node("Add", ["core_in", "n"], ["core_out"])]
    elif kind == "bernoulli":
        nodes = [node("Sigmoid", ["core_in"], ["p"]), node("Bernoulli", ["p"], ["b"]),
                 node("Mul", ["core_in", "b"], ["core_out"])]
    elif kind == "scalar":
        nodes = [node("RandomNormal", [], ["r"], shape=[1]), node("Mul", ["r", "scale"], ["n"]),
                 node("Add", ["core_in", "n"], ["core_out"])]
    else:
        raise ValueError(f"unknown noisy model {kind!r}")
    used = {name for n in nodes for name in n.input}
    return build(nodes, {k: v for k, v in constants.items() if k in used}, **kw)


# -- result folders ----------------------------------------------------------------------------------------------
def file_problem(path: Path) -> str | None:
    """Why a result file is not complete (None when it reads whole): volumes, PNGs, atlases, JSON, CSV, HTML."""
    import IBIXLogic as ibx

    name = path.name.lower()
    try:
        if name.endswith((".nrrd", ".nii.gz", ".nii", ".mha")):
            ibx.read_volume(path)
        elif name.endswith(".png"):
            from PIL import Image
            with Image.open(path) as image:
                image.load()
        elif name.endswith(".npz"):
            ibx.ResponseAtlas.load(path)
        elif name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith(".html"):
            if not path.read_text().rstrip().endswith("</html>"):
                return f"{path.name} is cut short"
        elif name.endswith(".csv"):
            import csv
            with open(path, newline="") as handle:
                rows = list(csv.reader(handle))
            if not rows or any(len(r) != len(rows[0]) for r in rows):
                return f"{path.name} is cut short"
    except Exception as exc:  # noqa: BLE001 - any failure to read is the problem reported
        return f"{path.name} does not read: {type(exc).__name__}: {str(exc)[:200]}"
    return None


def folder_problems(folder: Path, rerun: bool = False) -> list[str]:
    """Why a result folder does not describe itself: its summary.json must list exactly the (visible) files beside
    it, every one complete; with no summary there may be no visible file; subfolders (cohort cases) are checked the
    same way. Hidden bookkeeping (the lock, staging folders, temporary files) may remain after a kill, but not after
    a ``rerun``."""
    folder = Path(folder)
    if not folder.exists():
        return []
    problems = []
    entries = sorted(folder.iterdir())
    hidden = [p.name for p in entries if p.name.startswith(".")]
    if rerun and hidden:
        problems.append(f"{folder.name}: temporary entries left: {hidden}")
    files = {p.name for p in entries if p.is_file() and not p.name.startswith(".")}
    summary = folder / "summary.json"
    if summary.is_file():
        try:
            listed = {Path(p).name for p in json.loads(summary.read_text())["files"]}
        except Exception as exc:  # noqa: BLE001
            return problems + [f"{folder.name}/summary.json does not read: {exc}"]
        if listed != files:
            problems.append(f"{folder.name}: summary.json lists {sorted(listed - files)} that are missing and not "
                            f"{sorted(files - listed)} that are there")
    elif files:
        problems.append(f"{folder.name}: files without a summary.json: {sorted(files)}")
    for name in sorted(files):
        problem = file_problem(folder / name)
        if problem:
            problems.append(f"{folder.name}/{problem}")
    for sub in entries:
        if sub.is_dir() and not sub.name.startswith("."):
            problems += [f"{folder.name}/{p}" for p in folder_problems(sub, rerun)]
    return problems
