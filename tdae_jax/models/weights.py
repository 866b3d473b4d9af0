"""Torch-free weight conversion between PyTorch diffusers/transformers checkpoints and Flax param trees.

Implements, without importing torch and without ever unpickling:

- reading safetensors files (the format spec: 8-byte little-endian header length, JSON header, raw
  little-endian tensors), sharded ``*.safetensors.index.json`` checkpoints, ``bf16``/``fp16``/``fp8`` tensors
  (cast to the requested dtype), and Flax msgpack (``diffusion_flax_model.msgpack`` / ``flax_model.msgpack``);
- the PyTorch -> Flax renaming rules of diffusers' and transformers' ``modeling_flax_pytorch_utils``
  (Linear ``weight`` -> ``kernel`` transposed; Conv OIHW -> HWIO; norm ``weight`` -> ``scale``; Embedding
  ``weight`` -> ``embedding``; ``name.N`` -> ``name_N`` list segments; VAE attention ``to_q/to_k/to_v/to_out.0``
  -> ``query/key/value/proj_attn``, with the legacy PyTorch names accepted too), written here as one
  Flax-path -> PyTorch-name function so that loading and ``sd.save_diffusers`` are exact inverses;
- validation against the tree ``jax.eval_shape(module.init, ...)`` expects: a missing, extra (except known
  buffers such as ``position_ids``) or wrong-shaped tensor raises :class:`WeightsError` naming the file, the
  PyTorch tensor name and the expected/actual shapes.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import zlib
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy

from tdae_jax.data.files import new_file_mode

DIFFUSERS = ("diffusion_pytorch_model", "diffusion_flax_model.msgpack")  # (safetensors stem, msgpack file)
TRANSFORMERS = ("model", "flax_model.msgpack")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
IGNORABLE = re.compile(r"(^|\.)position_ids$")  # non-persistent buffers some checkpoints still carry
_LIST_SEGMENT = re.compile(
    r"^(down_blocks|up_blocks|resnets|attentions|transformer_blocks|downsamplers|upsamplers|to_out|net)_(\d+)$")
_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_LISTED = 8


class WeightsError(ValueError):
    """A weights directory or file does not match the model its config.json describes."""


# ---------------------------------------------------------------------------------------------- files
MAX_HEADER_BYTES = 100_000_000  # safetensors' own bound on the JSON header (tensor.rs MAX_HEADER_SIZE)
_ST_ITEMSIZE = {**{k: np.dtype(v).itemsize for k, v in _ST_DTYPES.items()}, "U16": 2, "U32": 4, "U64": 8}


def _not_safetensors_hint(head: bytes) -> str:
    """What the first bytes of a file that is not safetensors look like (pickle / PyTorch zip), for the message."""
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return ("; it starts like a Python pickle (a PyTorch checkpoint under a .safetensors name?), which tdae_jax "
                "never unpickles: convert it with safe_serialization=True")
    if head[:4] == b"PK\x03\x04":
        return "; it is a zip archive (PyTorch's torch.save format?): convert it with safe_serialization=True"
    return ""


def _check_tensor_table(path: Path, header: dict, data_bytes: int) -> None:
    """Every tensor's dtype, shape and ``data_offsets`` against the data section (``data_bytes`` long): the
    offsets tile it from 0 to its end, in order, and each range holds exactly prod(shape) * itemsize bytes
    (huggingface/safetensors, safetensors/src/tensor.rs ``Metadata::validate`` and the final size check of
    ``SafeTensors::read_metadata``)."""
    table = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
            ints = [*shape, start, end]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
                raise ValueError("negative or non-integer value")
        except (TypeError, KeyError, ValueError) as e:
            raise WeightsError(f"{path}: tensor '{name}' has an invalid header entry {info!r} ({e})") from None
        if dtype not in _ST_ITEMSIZE:
            raise WeightsError(f"{path}: tensor '{name}' has unsupported dtype {dtype!r}")
        if end > data_bytes or start > end:
            raise WeightsError(f"{path}: tensor '{name}' data_offsets [{start}, {end}) lie outside the data section "
                               f"({data_bytes} bytes): the file is truncated or corrupt")
        if end - start != int(np.prod(shape, dtype=object)) * _ST_ITEMSIZE[dtype]:
            raise WeightsError(f"{path}: tensor '{name}' holds {end - start} bytes, but shape {shape} {dtype} "
                               f"needs {int(np.prod(shape, dtype=object)) * _ST_ITEMSIZE[dtype]}")
        table.append((start, end, name))
    covered = 0
    for start, end, name in sorted(table):
        if start != covered:
            raise WeightsError(f"{path}: tensor '{name}' starts at byte {start} of the data section, expected "
                               f"{covered} (tensors overlap or leave a gap)")
        covered = end
    if covered != data_bytes:
        raise WeightsError(f"{path}: the tensors cover {covered} of the {data_bytes} data bytes (corrupt file)")


def safetensors_header(path: str | os.PathLike) -> tuple[int, dict]:
    """Checks a safetensors file's framing before any library reads it; returns ``(header length, header)``.

    The format (huggingface/safetensors README, "Format"; checks restated from safetensors/src/tensor.rs
    ``SafeTensors::read_metadata``): 8-byte little-endian header length ``n`` (at most ``MAX_HEADER_BYTES`` and
    at most the file size - 8), ``n`` bytes of UTF-8 JSON object, then the data section that the tensors'
    ``data_offsets`` tile exactly. Checked here because the library and ``f.read(n)`` fail badly on hostile
    files: a pickle under a ``.safetensors`` name or a length of 2**40 asks for terabytes (``MemoryError``),
    2**63 - 1 overflows (``OverflowError``), truncated data raises the library's own ``SafetensorError``.

    Raises:
      WeightsError (a ``ValueError``) naming the file and the problem; OSError when it cannot be read.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header "
                               "length)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise WeightsError(f"{path}: not a safetensors file: its header length field is {n} bytes but the file "
                               f"has {size} bytes (limit {MAX_HEADER_BYTES}){_not_safetensors_hint(head)}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise WeightsError(f"{path}: safetensors header is not UTF-8 JSON ({e}){_not_safetensors_hint(head)}") \
            from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: safetensors header is JSON {type(header).__name__}, expected an object")
    _check_tensor_table(path, header, size - 8 - n)
    return n, header


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file, in their stored dtype (``BF16``/``F8`` as ml_dtypes arrays).

    The framing is checked first (:func:`safetensors_header`), so a hostile or truncated file is a
    :class:`WeightsError` naming it, never a MemoryError or a library exception."""
    path = Path(path)
    try:
        n, header = safetensors_header(path)
        dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        if not dtypes <= set(_ST_DTYPES):
            raise WeightsError(f"{path}: unsupported dtype(s) {sorted(dtypes - set(_ST_DTYPES))}")
        if dtypes <= {"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL"}:
            return safetensors.numpy.load_file(str(path))
        data = np.memmap(path, np.uint8, "r", offset=8 + n)
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            out[name] = np.asarray(data[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"]))
        return out
    except WeightsError:
        raise
    except (OSError, ValueError, KeyError, safetensors.SafetensorError) as e:
        raise WeightsError(f"{path}: cannot read safetensors file ({e})") from e


def find_weights(directory: str | os.PathLike, kind: tuple[str, str] = DIFFUSERS) -> tuple[str, Path]:
    """Locate a component's weights: ``("safetensors" | "index" | "msgpack", path)``.

    Order: ``<stem>.safetensors``, ``<stem>.safetensors.index.json``, a single variant
    ``<stem>.<variant>.safetensors`` (e.g. ``fp16``), then the Flax msgpack. Pickle files are refused."""
    d = Path(directory)
    stem, msgpack = kind
    if not d.is_dir():
        raise WeightsError(f"{d}: component directory not found")
    if (d / f"{stem}.safetensors").is_file():
        return "safetensors", d / f"{stem}.safetensors"
    if (d / f"{stem}.safetensors.index.json").is_file():
        return "index", d / f"{stem}.safetensors.index.json"
    variants = sorted(d.glob(f"{stem}.*.safetensors")) + sorted(d.glob(f"{stem}.*.safetensors.index.json"))
    if len(variants) == 1:
        return ("index" if variants[0].name.endswith(".json") else "safetensors"), variants[0]
    if len(variants) > 1:
        raise WeightsError(f"{d}: several weight variants ({', '.join(p.name for p in variants)}); keep one")
    if (d / msgpack).is_file():
        return "msgpack", d / msgpack
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(
            f"{d / pickles[0]}: pickle checkpoint refused (tdae_jax never unpickles weights). Convert it to "
            f"safetensors first, e.g. in PyTorch: `Model.from_pretrained(dir).save_pretrained(dir, "
            f"safe_serialization=True)`, giving {stem}.safetensors")
    raise WeightsError(f"{d}: no weights found (looked for {stem}.safetensors, {stem}.safetensors.index.json, "
                       f"{msgpack})")


def read_state_dict(fmt: str, path: Path) -> tuple[dict[str, np.ndarray], dict[str, Path]]:
    """PyTorch state dict ``{name: array}`` and ``{name: file it came from}`` of a safetensors checkpoint."""
    if fmt == "safetensors":
        state = read_safetensors(path)
        return state, {k: path for k in state}
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise WeightsError(f"{path}: invalid safetensors index ({e})") from e
    state, files = {}, {}
    for shard in sorted(set(weight_map.values())):
        shard_path = path.parent / shard
        if not shard_path.is_file():
            raise WeightsError(f"{path}: shard {shard} is missing")
        for name, arr in read_safetensors(shard_path).items():
            state[name], files[name] = arr, shard_path
    for name, shard in weight_map.items():
        if name not in state:
            raise WeightsError(f"{path}: tensor '{name}' is listed for {shard} but that shard lacks it")
    return state, files


# ---------------------------------------------------------------------------------------------- naming
def pytorch_names(path: tuple[str, ...], vae: bool = False) -> list[str]:
    """Candidate PyTorch names of the Flax param ``path`` (first = the name we write)."""
    *mods, leaf = path
    if leaf not in ("kernel", "bias", "scale", "embedding"):
        raise WeightsError(f"no PyTorch name rule for Flax param {'/'.join(path)}")
    segs = [_LIST_SEGMENT.sub(r"\1.\2", s) for s in mods]
    pt_leaf = "bias" if leaf == "bias" else "weight"
    names = [".".join(segs + [pt_leaf])]
    if vae and mods and mods[-1] in _VAE_ATTENTION:  # diffusers >= 0.15 names first, legacy names accepted
        names.insert(0, ".".join(segs[:-1] + [_VAE_ATTENTION[mods[-1]], pt_leaf]))
    return names


def to_flax_layout(leaf: str, arr: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
    if leaf != "kernel":
        return arr
    if arr.ndim == 4 and len(expected) == 2 and arr.shape[2:] == (1, 1):  # 1x1 conv stored for a Linear
        arr = arr[:, :, 0, 0]
    if arr.ndim == 4:
        return arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    return arr.T if arr.ndim == 2 else arr


def to_pytorch_layout(leaf: str, arr: np.ndarray) -> np.ndarray:
    if leaf != "kernel":
        return arr
    if arr.ndim == 4:
        return arr.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    return arr.T if arr.ndim == 2 else arr


def _shape_pt(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return to_pytorch_layout(leaf, np.empty(shape, np.bool_)).shape


def _raise(problems: list[str], header: str):
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise WeightsError(header + "\n  " + "\n  ".join(problems[:_MAX_LISTED]) + more)


# ---------------------------------------------------------------------------------------------- conversion
def init_args(module) -> tuple:
    """Minimal dummy inputs for ``module.init`` (shapes of params do not depend on them)."""
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel

    if isinstance(module, FlaxAutoencoderKL):
        s = 2 ** len(module.block_out_channels)
        return (jnp.zeros((1, module.in_channels, s, s)),)
    if isinstance(module, FlaxUNet2DConditionModel):
        s = 2 ** len(module.block_out_channels)
        return (jnp.zeros((1, module.in_channels, s, s)), jnp.ones((1,), jnp.int32),
                jnp.zeros((1, 1, module.cross_attention_dim)))
    ids = jnp.zeros((1, 2), jnp.int32)  # FlaxCLIPTextModule
    return ids, jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(2), (1, 2))


def expected_params(module) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Flat ``{path: ShapeDtypeStruct}`` of the params ``module`` builds from its config."""
    tree = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *init_args(module)))["params"]
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def read_config(path: Path) -> dict:
    """A model's ``config.json`` as a dict, or :class:`WeightsError` naming the file (missing / invalid JSON)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: config file not found") from None
    except ValueError as e:
        raise WeightsError(f"{path}: invalid JSON ({e})") from e


def size_multiple(weights_dir: str | os.PathLike, family: str) -> int | None:
    """The side (px) every working image of a surrogate in ``weights_dir`` must be a multiple of, from its configs.

    VAE downsampling ``2**(len(vae block_out_channels) - 1)`` times the denoiser's: the UNet halves the latent
    ``len(block_out_channels) - 1`` times and its Flax upsamplers double it back to a fixed size (diffusers
    ``FlaxUpsample2D``), so a latent side not divisible by that cannot be concatenated with its skip; SD3's
    transformer patchifies the latent by ``patch_size``. None when the configs cannot be read (loading will
    report that, naming the file). Reads two JSON files; never the weights.
    """
    d = Path(weights_dir)
    denoiser = "transformer" if family == "sd3" else "unet"
    try:
        vae, net = read_config(d / "vae" / "config.json"), read_config(d / denoiser / "config.json")
        vae_factor = 2 ** (len(vae.get("block_out_channels", (64,))) - 1)
        net_factor = (int(net.get("patch_size", 2)) if family == "sd3"
                      else 2 ** (len(net.get("block_out_channels", (320,))) - 1))
    except (WeightsError, TypeError, ValueError, AttributeError):
        return None
    return vae_factor * net_factor if vae_factor >= 1 and net_factor >= 1 else None


def random_params(module, seed: int = 0, dtype=jnp.float32, *, expected: dict | None = None,
                  special: dict | None = None) -> dict:
    """Seeded random params for ``module``, drawn with numpy (compiling ``module.init`` costs minutes on CPU
    for a UNet): kernels ``N(0, 1/fan_in)`` (LeCun normal), embeddings ``N(0, 0.02^2)``, norm scales 1,
    biases 0. Each leaf's stream is keyed by ``(seed, path)``, so a leaf does not depend on the others.
    ``expected``: the flat ``{path: ShapeDtypeStruct}`` (default :func:`expected_params`); ``special``: leaf name
    -> ``fn(rng, shape) -> array`` for leaves outside that scheme (e.g. CLIP's ``logit_scale``)."""
    out = {}
    special = special or {}
    for path, spec in (expected if expected is not None else expected_params(module)).items():
        rng = np.random.default_rng([seed, zlib.crc32("/".join(path).encode())])
        shape, leaf = tuple(spec.shape), path[-1]
        if leaf in special:
            arr = special[leaf](rng, shape)
        elif leaf == "kernel":
            arr = rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        elif leaf == "embedding":
            arr = 0.02 * rng.standard_normal(shape)
        else:
            arr = np.ones(shape) if leaf == "scale" else np.zeros(shape)
        out[path] = jnp.asarray(arr, dtype)
    return flax.traverse_util.unflatten_dict(out)


def match_tensors(shapes: dict[str, tuple[int, ...]], files: dict[str, Path], expected: dict, *, source: Path,
                  vae: bool = False) -> dict[tuple[str, ...], str]:
    """Pair every expected Flax param with one PyTorch tensor name, checking shapes (from ``shapes`` alone, so a
    full-size model can be checked without its data); raise :class:`WeightsError` listing every problem."""
    plan, missing, wrong = {}, [], []
    for path, spec in expected.items():
        names = pytorch_names(path, vae)
        name = next((n for n in names if n in shapes), None)
        leaf, want_pt = path[-1], _shape_pt(path[-1], spec.shape)
        if name is None:
            missing.append(f"{source}: missing tensor '{names[0]}' (expected shape {want_pt}; "
                           f"Flax param {'/'.join(path)})")
            continue
        got = to_flax_layout(leaf, np.broadcast_to(np.zeros((), np.bool_), shapes[name]), spec.shape).shape
        if got != tuple(spec.shape):
            wrong.append(f"{files[name]}: tensor '{name}' has shape {tuple(shapes[name])}, expected "
                         f"{want_pt} (Flax param {'/'.join(path)} {tuple(spec.shape)})")
            continue
        plan[path] = name
    used = set(plan.values())
    extra = [f"{files[n]}: unexpected tensor '{n}' with shape {tuple(shapes[n])} (not in the model "
             f"config.json describes)" for n in sorted(shapes) if n not in used and not IGNORABLE.search(n)]
    _raise(missing, f"{source}: {len(missing)} tensor(s) missing")
    _raise(wrong, f"{source}: {len(wrong)} tensor(s) with the wrong shape")
    _raise(extra, f"{source}: {len(extra)} unexpected tensor(s)")
    return plan


def convert_pytorch(state: dict[str, np.ndarray], files: dict[str, Path], expected: dict, *, source: Path,
                    vae: bool = False, dtype=jnp.float32) -> dict:
    """PyTorch state dict -> nested Flax params matching ``expected`` exactly (or :class:`WeightsError`)."""
    plan = match_tensors({k: v.shape for k, v in state.items()}, files, expected, source=source, vae=vae)
    out = {path: jnp.asarray(np.asarray(to_flax_layout(path[-1], state[name], expected[path].shape),
                                        dtype=np.dtype(dtype)))
           for path, name in plan.items()}
    return flax.traverse_util.unflatten_dict(out)


def convert_msgpack(path: Path, expected: dict, dtype=jnp.float32) -> dict:
    """Flax msgpack params (names already Flax's) -> nested params validated against ``expected``."""
    try:
        tree = flax.serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
        raise WeightsError(f"{path}: cannot read Flax msgpack ({e})") from e
    if set(tree) == {"params"}:
        tree = tree["params"]
    flat = flax.traverse_util.flatten_dict(tree)
    missing = [f"{path}: missing param '{'/'.join(p)}' (expected shape {tuple(s.shape)})"
               for p, s in expected.items() if p not in flat]
    wrong = [f"{path}: param '{'/'.join(p)}' has shape {tuple(np.shape(flat[p]))}, expected {tuple(s.shape)}"
             for p, s in expected.items() if p in flat and tuple(np.shape(flat[p])) != tuple(s.shape)]
    extra = [f"{path}: unexpected param '{'/'.join(p)}'" for p in flat if p not in expected]
    _raise(missing + wrong + extra, f"{path}: params do not match the model config.json describes")
    return flax.traverse_util.unflatten_dict(
        {p: jnp.asarray(np.asarray(flat[p], dtype=np.dtype(dtype))) for p in expected})


def load_params(directory: str | os.PathLike, module, kind: tuple[str, str] = DIFFUSERS, *, vae: bool = False,
                dtype=jnp.float32) -> dict:
    """Load and validate one component's params from ``directory`` (safetensors, sharded, or msgpack)."""
    fmt, path = find_weights(directory, kind)
    expected = expected_params(module)
    if fmt == "msgpack":
        return convert_msgpack(path, expected, dtype)
    state, files = read_state_dict(fmt, path)
    return convert_pytorch(state, files, expected, source=path, vae=vae, dtype=dtype)


def to_pytorch(params: Any, *, vae: bool = False, dtype=np.float32) -> dict[str, np.ndarray]:
    """Nested Flax params -> PyTorch state dict (the inverse of :func:`convert_pytorch`)."""
    out = {}
    for path, x in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items():
        arr = to_pytorch_layout(path[-1], np.asarray(jax.device_get(x)).astype(dtype))
        out[pytorch_names(path, vae)[0]] = np.ascontiguousarray(arr)
    return out


# ---------------------------------------------------------------------------------------------- writing
def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())  # mkstemp's 0600 -> what open(path, "w") would give (0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: Path, obj: dict) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write(Path(path), write)


def write_safetensors(path: Path, state: dict[str, np.ndarray]) -> None:
    _atomic_write(Path(path), lambda tmp: safetensors.numpy.save_file(state, tmp, metadata={"format": "pt"}))
