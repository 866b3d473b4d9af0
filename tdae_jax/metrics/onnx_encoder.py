"""ONNX face-recognition models (insightface ArcFace ``w600k_r50.onnx``, ``glintr100.onnx``) as differentiable
JAX identity encoders, torch-free: the graph is interpreted op by op with ``jax.lax`` (NCHW, as ONNX), the
initializers become the params pytree, so PGD differentiates the model exactly as exported (fused or not).

Only the ``onnx`` package (PyPI) is needed to read the file. Supported ops: the ones ArcFace exports use
(Conv, BatchNormalization, PRelu, Relu, Add, Sub, Mul, Div, Flatten, Reshape, Gemm, MatMul, Constant, Identity,
Transpose, GlobalAveragePool, Shape/Gather/Unsqueeze/Concat of static shapes). Anything else raises naming the op.

``load(path, name=...)`` -> ``(IdentityEncoder, params)`` with insightface's input convention: RGB,
``(255 p - 127.5) / 127.5`` (``model_zoo/arcface_onnx.py``: input_mean = input_std = 127.5, swapRB), 112x112
crops aligned to ``identity.ARCFACE_TEMPLATE``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tdae_jax.metrics.identity import IdentityEncoder, template_align


@dataclasses.dataclass(frozen=True)
class Node:
    op: str
    inputs: tuple
    outputs: tuple
    attrs: tuple  # sorted (name, value) pairs, values made hashable


def _attr(a):
    from onnx import helper

    v = helper.get_attribute_value(a)
    if isinstance(v, (list, tuple)):
        return tuple(v)
    if isinstance(v, bytes):
        return v.decode()
    if hasattr(v, "dims"):  # TensorProto (Constant)
        from onnx import numpy_helper

        return ("tensor", numpy_helper.to_array(v).tolist(), str(numpy_helper.to_array(v).dtype))
    return v


def read(path) -> tuple[tuple, str, str, dict]:
    """``(nodes, input name, output name, initializers {name: np.ndarray})`` of an ONNX file."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("reading ONNX models needs the 'onnx' package (pip install -e \".[faces]\")") from e
    m = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    nodes = tuple(Node(n.op_type, tuple(n.input), tuple(n.output),
                       tuple(sorted((a.name, _attr(a)) for a in n.attribute))) for n in m.graph.node)
    inputs = [i.name for i in m.graph.input if i.name not in inits]
    return nodes, inputs[0], m.graph.output[0].name, inits


def _pads(attrs, nd=2):
    p = attrs.get("pads", (0,) * 2 * nd)
    return [(p[i], p[i + nd]) for i in range(nd)]


def run_graph(nodes, input_name, output_name, params: dict, x):
    """Evaluate the graph on ``x`` (NCHW) with ``params`` = the initializers (jax arrays)."""
    env = dict(params)
    env[input_name] = x
    for n in nodes:
        a = dict(n.attrs)
        i = [env[k] if k else None for k in n.inputs]
        op = n.op
        if op == "Conv":
            strides = a.get("strides", (1, 1))
            y = jax.lax.conv_general_dilated(i[0], i[1], strides, _pads(a), rhs_dilation=a.get("dilations", (1, 1)),
                                             dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                             feature_group_count=a.get("group", 1))
            out = y if len(i) < 3 or i[2] is None else y + i[2].reshape(1, -1, 1, 1)
        elif op == "BatchNormalization":
            shp = (1, -1) + (1,) * (i[0].ndim - 2)
            inv = i[1] * jax.lax.rsqrt(i[4] + a.get("epsilon", 1e-5))
            out = (i[0] - i[3].reshape(shp)) * inv.reshape(shp) + i[2].reshape(shp)
        elif op == "PRelu":
            slope = i[1]
            if slope.ndim == 1 and i[0].ndim == 4:
                slope = slope.reshape(1, -1, 1, 1)
            out = jnp.where(i[0] >= 0, i[0], slope * i[0])
        elif op == "Relu":
            out = jax.nn.relu(i[0])
        elif op in ("Add", "Sub", "Mul", "Div"):
            out = {"Add": jnp.add, "Sub": jnp.subtract, "Mul": jnp.multiply, "Div": jnp.divide}[op](i[0], i[1])
        elif op == "Flatten":
            ax = a.get("axis", 1)
            out = i[0].reshape(int(np.prod(i[0].shape[:ax])), -1)
        elif op == "Reshape":
            shape = [int(s) for s in np.asarray(i[1])]
            shape = [i[0].shape[k] if s == 0 else s for k, s in enumerate(shape)]
            out = i[0].reshape(shape)
        elif op == "Gemm":
            A = i[0].T if a.get("transA", 0) else i[0]
            B = i[1].T if a.get("transB", 0) else i[1]
            out = a.get("alpha", 1.0) * (A @ B)
            if len(i) > 2 and i[2] is not None:
                out = out + a.get("beta", 1.0) * i[2]
        elif op == "MatMul":
            out = i[0] @ i[1]
        elif op == "GlobalAveragePool":
            out = jnp.mean(i[0], axis=tuple(range(2, i[0].ndim)), keepdims=True)
        elif op == "Transpose":
            out = jnp.transpose(i[0], a.get("perm"))
        elif op == "Identity" or op == "Dropout":
            out = i[0]
        elif op == "Constant":
            _, vals, dt = a["value"]
            out = np.asarray(vals, dt)
        elif op == "Shape":
            out = np.asarray(i[0].shape, np.int64)
        elif op == "Gather":
            out = np.take(np.asarray(i[0]), np.asarray(i[1]), axis=a.get("axis", 0))
        elif op == "Unsqueeze":
            axes = a.get("axes") if "axes" in a else tuple(np.asarray(i[1]).tolist())
            out = np.expand_dims(np.asarray(i[0]), axes)
        elif op == "Concat":
            out = np.concatenate([np.atleast_1d(np.asarray(v)) for v in i], axis=a.get("axis", 0))
        else:
            raise NotImplementedError(f"ONNX op {op!r} (node {n.outputs[0]!r}) is not supported by onnx_encoder")
        env[n.outputs[0]] = out
    return env[output_name]


class OnnxModule(nn.Module):
    """Flax wrapper: input NHWC (already normalized), params = the initializers."""

    nodes: tuple
    input_name: str
    output_name: str

    @nn.compact
    def __call__(self, x):
        return run_graph(self.nodes, self.input_name, self.output_name, self.variables["params"],
                         jnp.transpose(x, (0, 3, 1, 2)))


def load(path, name: str | None = None, size: int = 112) -> tuple[IdentityEncoder, dict]:
    """``(encoder, params)`` of an ArcFace ONNX file (insightface input convention, ARCFACE_TEMPLATE)."""
    nodes, inp, out, inits = read(path)
    floats = {k: jnp.asarray(v) for k, v in inits.items() if v.dtype.kind == "f"}
    consts = {k: v for k, v in inits.items() if v.dtype.kind != "f"}  # shape operands stay static
    module = OnnxModule(nodes, inp, out)
    if consts:  # bake integer initializers into Constant nodes so that params are all floats
        extra = tuple(Node("Constant", (), (k,), (("value", ("tensor", v.tolist(), str(v.dtype))),))
                      for k, v in consts.items())
        module = OnnxModule(extra + nodes, inp, out)
    enc = IdentityEncoder(name or Path(path).stem, module, size, lambda f: (f * 255.0 - 127.5) / 127.5,
                          template_align)
    return enc, floats
