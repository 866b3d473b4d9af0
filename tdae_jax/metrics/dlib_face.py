"""dlib's face pipeline: HOG detection + 5-point landmarks (host side, via the ``dlib`` package) and dlib's
ResNet face descriptor ported to Flax (differentiable), with a torch-free converter from the ``.dat`` file.

The descriptor network is ``anet_type`` of dlib's ``examples/dnn_face_recognition_ex.cpp``
(``dlib_face_recognition_resnet_model_v1.dat``, shipped by the ``face-recognition-models`` wheel; 99.38% LFW):
input 150x150 RGB ``(255 p - avg_rgb) / 256``; conv7x7/2 (32) - affine - relu - maxpool3/2; residual blocks
``relu(add_prev(affine(con3x3(relu(affine(con3x3/s(x))))), shortcut))`` with ``shortcut = avg_pool2/2(x)`` in the
down blocks (channels and sizes zero-padded top-left, as dlib's ``add_prev`` does); 3x32, 4x64, 3x128,
3x256, 1x256; global average; ``fc_no_bias`` 128 (output not normalized).

``load_params(path)`` parses dlib's serialization (``serialize()`` of ``loss_metric<...>``: var-length ints
``[size|sign byte][LE bytes]``, strings ``int len + bytes``, tensors ``int version, n, k, nr, nc`` + raw LE
float32) by walking the layer records in input-to-output order. ``chip_affine`` reproduces dlib's face chip
geometry (``get_face_chip_details(shape, 150, 0.25)``) as ``M [2,3]`` (image pixel -> chip pixel), so the
differentiable warp of ``zeroshot.warp`` feeds the port the same chip dlib extracts.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tdae_jax.metrics.identity import IdentityEncoder

CHIP_SIZE, CHIP_PADDING = 150, 0.25
_NAMES = (b"input_rgb_image_sized", b"con_4", b"affine_", b"relu_", b"max_pool_2", b"avg_pool_2", b"add_prev_",
          b"fc_2")


class DlibUnavailable(RuntimeError):
    """dlib or the face-recognition-models files are not installed."""


def models_dir() -> Path:
    """The ``face_recognition_models/models`` folder (found without importing the package, which needs
    the removed ``pkg_resources``)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise DlibUnavailable("face-recognition-models is not installed "
                              "(pip install -e \".[faces]\": dlib and its face models)")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def dlib_module():
    try:
        import dlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DlibUnavailable("dlib is not installed (pip install -e \".[faces]\": dlib and its face models)") from e
    return dlib


def available() -> bool:
    try:
        dlib_module()
        return (models_dir() / "dlib_face_recognition_resnet_model_v1.dat").exists()
    except DlibUnavailable:
        return False


# ------------------------------------------------------------------------------------------------ .dat parser
class _Reader:
    def __init__(self, data: bytes):
        self.d, self.i = data, 0

    def int(self) -> int:
        b = self.d[self.i]
        n = b & 0x0F
        v = int.from_bytes(self.d[self.i + 1:self.i + 1 + n], "little")
        self.i += 1 + n
        return -v if b & 0x80 else v

    def float(self) -> float:
        m, e = self.int(), self.int()
        return float(m) * 2.0 ** e

    def tensor(self) -> np.ndarray:
        version = self.int()
        if version != 2:
            raise ValueError(f"dlib tensor version {version} at byte {self.i} (expected 2)")
        shape = tuple(self.int() for _ in range(4))
        n = int(np.prod(shape))
        a = np.frombuffer(self.d, "<f4", n, self.i).reshape(shape)
        self.i += 4 * n
        return a

    def next_layer(self, window: int = 1 << 16) -> bytes | None:
        """Skip to the next layer record (a length-prefixed known name); None at the end."""
        best = None
        for name in _NAMES:
            j = self.d.find(bytes([1, len(name)]) + name, self.i, self.i + window)
            if j >= 0 and (best is None or j < best[0]):
                best = (j, name)
        if best is None:
            return None
        self.i = best[0] + 2 + len(best[1])
        return best[1]


def parse_dat(path) -> list[dict]:
    """Layer records, input to output: ``{"type", ...fields}`` (weights as numpy arrays)."""
    r = _Reader(Path(path).read_bytes())
    layers = []
    while (name := r.next_layer()) is not None:
        if name == b"input_rgb_image_sized":
            layers.append({"type": "input", "avg": [r.float(), r.float(), r.float()], "nr": r.int(), "nc": r.int()})
        elif name == b"con_4":
            params = r.tensor().reshape(-1)
            nf, nr, nc, sy, sx, py, px = (r.int() for _ in range(7))
            w = params[:-nf]
            k = w.size // (nf * nr * nc)
            layers.append({"type": "con", "w": w.reshape(nf, k, nr, nc), "b": params[-nf:], "stride": (sy, sx),
                           "pad": (py, px)})
        elif name == b"affine_":
            p = r.tensor().reshape(-1)
            layers.append({"type": "affine", "gamma": p[: p.size // 2], "beta": p[p.size // 2:]})
        elif name == b"relu_":
            layers.append({"type": "relu"})
        elif name in (b"max_pool_2", b"avg_pool_2"):
            nr, nc, sy, sx, py, px = (r.int() for _ in range(6))
            layers.append({"type": name[:3].decode() + "_pool", "window": (nr, nc), "stride": (sy, sx),
                           "pad": (py, px)})
        elif name == b"add_prev_":
            layers.append({"type": "add_prev"})
        elif name == b"fc_2":
            n_out, n_in = r.int(), r.int()
            p = r.tensor().reshape(-1)
            layers.append({"type": "fc", "w": p[: n_in * n_out].reshape(n_in, n_out)})
    return layers


def plan(layers: list[dict]) -> tuple[list, dict]:
    """Group the flat records into (architecture, params): stem, residual blocks, head."""
    L = list(layers)
    if L[0]["type"] != "input" or L[-1]["type"] != "fc":
        raise ValueError("not a dlib metric-learning ResNet (.dat): unexpected first/last layer")
    avg = L[0]["avg"]
    params, arch = {"avg_rgb": np.asarray(avg, np.float32)}, []
    i = 1
    conv = lambda rec: {"kernel": np.transpose(rec["w"], (2, 3, 1, 0)).copy(), "bias": rec["b"].copy()}  # noqa
    aff = lambda rec: {"gamma": rec["gamma"].copy(), "beta": rec["beta"].copy()}  # noqa
    seq = [x["type"] for x in L[1:5]]
    if seq != ["con", "affine", "relu", "max_pool"]:
        raise ValueError(f"unexpected dlib stem {seq}")
    params["stem"] = {"conv": conv(L[1]), "affine": aff(L[2])}
    arch.append(("stem", L[1]["stride"], L[1]["pad"], L[4]["window"], L[4]["stride"]))
    i, b = 5, 0
    while L[i]["type"] == "con":
        types = [x["type"] for x in L[i:i + 8]]
        down = types[5] == "avg_pool"
        n = 8 if down else 7
        want = ["con", "affine", "relu", "con", "affine"] + (["avg_pool"] if down else []) + ["add_prev", "relu"]
        if types[:n] != want:
            raise ValueError(f"unexpected dlib residual block at record {i}: {types[:n]}")
        params[f"block{b}"] = {"conv1": conv(L[i]), "affine1": aff(L[i + 1]), "conv2": conv(L[i + 3]),
                               "affine2": aff(L[i + 4])}
        arch.append(("block", L[i]["stride"], L[i]["pad"], L[i + 3]["pad"],
                     (L[i + 5]["window"], L[i + 5]["stride"]) if down else None))
        i, b = i + n, b + 1
    if L[i]["type"] != "avg_pool" or L[i]["window"] != (0, 0):
        raise ValueError("expected avg_pool_everything before the fc layer")
    params["fc"] = {"kernel": L[-1]["w"].copy()}
    return arch, params


# ------------------------------------------------------------------------------------------------ Flax port
def _conv(x, p, stride, pad):
    return jax.lax.conv_general_dilated(x, p["kernel"], stride, [(pad[0], pad[0]), (pad[1], pad[1])],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]


def _add_prev(a, b):
    """dlib add_prev: the sum over the max extent of both, each zero-padded at the end of every axis."""
    shape = tuple(max(x, y) for x, y in zip(a.shape, b.shape))
    pad = lambda t: jnp.pad(t, [(0, s - d) for s, d in zip(shape, t.shape)])  # noqa: E731
    return pad(a) + pad(b)


class DlibResNet(nn.Module):
    """``arch`` from :func:`plan` (static); params given to ``apply`` as ``{"params": ...}``."""

    arch: tuple

    @nn.compact
    def __call__(self, x):
        p = self.variables["params"]
        for li, layer in enumerate(self.arch):
            if layer[0] == "stem":
                _, stride, pad, win, pstride = layer
                s = p["stem"]
                x = jax.nn.relu(_conv(x, s["conv"], stride, pad) * s["affine"]["gamma"] + s["affine"]["beta"])
                x = nn.max_pool(x, win, pstride, padding="VALID")
            else:
                _, stride, pad1, pad2, pool = layer
                q = p[f"block{li - 1}"]
                y = jax.nn.relu(_conv(x, q["conv1"], stride, pad1) * q["affine1"]["gamma"] + q["affine1"]["beta"])
                y = _conv(y, q["conv2"], (1, 1), pad2) * q["affine2"]["gamma"] + q["affine2"]["beta"]
                sc = nn.avg_pool(x, pool[0], pool[1], padding="VALID") if pool else x
                x = jax.nn.relu(_add_prev(y, sc))
        x = jnp.mean(x, axis=(1, 2))
        return x @ p["fc"]["kernel"]


def _preprocess(avg):
    avg = jnp.asarray(avg, jnp.float32)
    return lambda f: (f * 255.0 - avg) / 256.0


@functools.lru_cache(maxsize=2)
def load(path: str | None = None) -> tuple[IdentityEncoder, dict]:
    """``(encoder, params)`` of dlib's face descriptor (default: the face-recognition-models file)."""
    path = Path(path) if path else models_dir() / "dlib_face_recognition_resnet_model_v1.dat"
    if not path.exists():
        raise DlibUnavailable(f"{path}: dlib face recognition model not found")
    arch, params = plan(parse_dat(path))
    avg = params.pop("avg_rgb")
    params = jax.tree.map(jnp.asarray, params)
    enc = IdentityEncoder("dlib_resnet_v1", DlibResNet(tuple(arch)), CHIP_SIZE, _preprocess(avg), chip_affine,
                          landmark_format="dlib")
    return enc, params


# ------------------------------------------------------------------------------------------------ detection + chips
@functools.lru_cache(maxsize=1)
def _dlib_models():
    dlib = dlib_module()
    m = models_dir()
    return (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(m / "shape_predictor_5_face_landmarks.dat")),
            dlib.face_recognition_model_v1(str(m / "dlib_face_recognition_resnet_model_v1.dat")))


def _uint8(image) -> np.ndarray:
    a = np.asarray(image)
    return a if a.dtype == np.uint8 else np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)


def detect(image, upsample: int = 1) -> list:
    """dlib HOG face boxes ``[(left, top, right, bottom)]`` of an ``[H,W,3]`` image (uint8 or [0,1])."""
    det, _, _ = _dlib_models()
    return [(r.left(), r.top(), r.right(), r.bottom()) for r in det(np.ascontiguousarray(_uint8(image)), upsample)]


def landmarks(image, box=None, upsample: int = 1) -> np.ndarray | None:
    """5-point landmarks ``[5,2]`` (x, y) of the largest detected face (or of ``box``); None if no face.

    The points are dlib's order (right eye outer, right eye inner, left eye outer, left eye inner, nose);
    :func:`to_arcface_order` converts them to insightface's (left eye, right eye, nose, mouth L, mouth R)."""
    dlib = dlib_module()
    _, sp, _ = _dlib_models()
    img = np.ascontiguousarray(_uint8(image))
    if box is None:
        boxes = detect(img, upsample)
        if not boxes:
            return None
        box = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    shape = sp(img, dlib.rectangle(*[int(v) for v in box]))
    return np.array([(p.x, p.y) for p in shape.parts()], np.float64)


def to_arcface_order(lm5_dlib: np.ndarray) -> np.ndarray:
    """dlib 5 points -> insightface's 5 (image-left eye, image-right eye, nose, mouth left, mouth right).

    dlib has eye corners and the nose base but no mouth: eye centres are the corner midpoints, the nose is
    dlib's point 4, and the mouth corners are placed from the eye geometry with the ArcFace template's
    proportions (mouth centre 1.154 eye distances below the eye centre, half width 0.414): a documented
    approximation; pass detector landmarks with mouth corners when you have them."""
    p = np.asarray(lm5_dlib, np.float64)
    left_eye, right_eye = (p[2] + p[3]) / 2, (p[0] + p[1]) / 2  # dlib 0-1: image-right eye, 2-3: image-left
    ex = right_eye - left_eye
    down = np.array([-ex[1], ex[0]])  # perpendicular, pointing down in image coordinates
    mouth_c = (left_eye + right_eye) / 2 + down * 1.154
    return np.stack([left_eye, right_eye, p[4], mouth_c - ex * 0.414, mouth_c + ex * 0.414])


def from_arcface_order(lm5_arcface: np.ndarray) -> np.ndarray:
    """insightface 5 points -> dlib's 5 (approximate: eye corners at +-0.2 eye distances from the centres,
    the nose base 0.1 eye distances below the nose tip)."""
    p = np.asarray(lm5_arcface, np.float64)
    ex = p[1] - p[0]
    down = np.array([-ex[1], ex[0]])
    return np.stack([p[1] + 0.2 * ex, p[1] - 0.2 * ex, p[0] - 0.2 * ex, p[0] + 0.2 * ex, p[2] + 0.1 * down])


def chip_affine(lm5_dlib, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> np.ndarray:
    """``M [2,3]`` (image pixel -> chip pixel) of dlib's ``get_face_chip_details(shape, size, padding)``."""
    dlib = dlib_module()
    pts = np.asarray(lm5_dlib, np.float64)
    x0, y0 = pts.min(0)
    x1, y1 = pts.max(0)
    shape = dlib.full_object_detection(dlib.rectangle(int(x0), int(y0), int(x1), int(y1)),
                                       [dlib.point(int(round(x)), int(round(y))) for x, y in pts])
    cd = dlib.get_face_chip_details(shape, size, padding)
    r = cd.rect
    cx, cy = (r.left() + r.right()) / 2.0, (r.top() + r.bottom()) / 2.0
    sx, sy = (r.right() - r.left()) / (cd.cols - 1), (r.bottom() - r.top()) / (cd.rows - 1)
    c, s = np.cos(cd.angle), np.sin(cd.angle)
    rot = np.array([[c, -s], [s, c]])
    a = rot @ np.diag([sx, sy])  # chip (u, v) -> image: rot @ (tl - center + (u sx, v sy)) + center
    t = rot @ np.array([r.left() - cx, r.top() - cy]) + np.array([cx, cy])
    fwd = np.eye(3)
    fwd[:2, :2], fwd[:2, 2] = a, t
    return np.linalg.inv(fwd)[:2].astype(np.float32)


def dlib_descriptor(image, lm5_dlib=None, chip=None) -> np.ndarray:
    """dlib's own 128-d descriptor (reference for parity tests): of a 150x150 ``chip`` or of ``image`` at
    the landmarks."""
    dlib = dlib_module()
    _, _, fr = _dlib_models()
    if chip is not None:
        return np.asarray(fr.compute_face_descriptor(np.ascontiguousarray(_uint8(chip))), np.float32)
    img = np.ascontiguousarray(_uint8(image))
    pts = np.asarray(lm5_dlib)
    x0, y0 = pts.min(0)
    x1, y1 = pts.max(0)
    shape = dlib.full_object_detection(dlib.rectangle(int(x0), int(y0), int(x1), int(y1)),
                                       [dlib.point(int(round(x)), int(round(y))) for x, y in pts])
    return np.asarray(fr.compute_face_descriptor(img, shape), np.float32)


def dlib_chip(image, lm5_dlib) -> np.ndarray:
    """dlib's own 150x150 chip (uint8) at the landmarks."""
    dlib = dlib_module()
    pts = np.asarray(lm5_dlib)
    x0, y0 = pts.min(0)
    x1, y1 = pts.max(0)
    shape = dlib.full_object_detection(dlib.rectangle(int(x0), int(y0), int(x1), int(y1)),
                                       [dlib.point(int(round(x)), int(round(y))) for x, y in pts])
    return np.asarray(dlib.get_face_chip(np.ascontiguousarray(_uint8(image)), shape, CHIP_SIZE, CHIP_PADDING))
