"""Common image-to-image generator architectures as small ONNX models with random weights (built with onnx.helper).

The benchmarks of model work against brute force (``benchmark_work.py``) run IBIX on the architectures medical
image generators are built from: a BatchNorm U-Net whose reach (51 pixels) is near the size of a 256-pixel image;
encoder-decoders with InstanceNorm, GroupNorm or squeeze-excitation (their response is global: a normalisation
or a gate over the whole image); pix2pix's U-Net-256 (eight stride-2 convolutions down to a 1x1 bottleneck, a fixed
256x256 input of 3 channels, the architecture of the method paper's MRI->CT example); and ResNet generators
(CycleGAN's, InstanceNorm and reflection padding; pix2pix's ResNet variant with BatchNorm). The weights are random:
the benchmarks count model evaluations, which do not depend on them. Nothing is written to the repository; the
models are built in memory and saved to a temporary folder by the caller.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class Graph:
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


def _double_conv(g: Graph, x: str, cin: int, cout: int, norm: str, groups: int = 4) -> str:
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
    g = Graph(seed)
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
    g = Graph(seed)
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
    g = Graph(seed)
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


def save(name: str, folder: Path) -> Path:
    """Build generator ``name`` and write it with its card (2D, NCHW, input "x", output "y") into ``folder``."""
    builder, card, _ = GENERATORS[name]
    card = json.loads(json.dumps(card))
    card.setdefault("input", {}).update({"name": "x", "layout": "NCHW"})
    card["input"].setdefault("channels", ["image"])
    card.update({"spatial_dims": 2, "output": {"name": "y", "layout": "NCHW", "channels": ["synthetic"]}})
    path = Path(folder) / f"{name}.onnx"
    onnx.save(builder(), str(path))
    path.with_suffix(".json").write_text(json.dumps(card))
    return path
