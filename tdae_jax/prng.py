"""Derived PRNG keys: results never depend on batch layout, device count or resumption.

Every random draw of an image's optimisation is keyed by ``fold_in(fold_in(base, image_uid), step)``
(docs/design.md, convention 4). ``image_uid`` is a stable 31-bit hash of the image id (its file stem), so
the same image gets the same noise wherever it lands in a batch, on however many devices. A file name that is
not valid UTF-8 hashes its own bytes (``id_bytes``), so such an input gets a uid like any other.
"""
from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np


def id_bytes(image_id: str | bytes) -> bytes:
    """The bytes an id is hashed from: UTF-8 for every valid string (so uids of ordinary names never change).

    An id taken from a file name that is not valid UTF-8 holds lone surrogates (Python decodes such names with
    ``surrogateescape``, PEP 383); they are encoded back to the name's own bytes, as ``os.fsencode`` does on a
    UTF-8 file system, but independently of the platform's file-system encoding. Any other lone surrogate
    (not from a file name) is encoded with ``surrogatepass``. Deterministic; never raises for a ``str``.
    """
    if isinstance(image_id, bytes):
        return image_id
    try:
        return image_id.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return image_id.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return image_id.encode("utf-8", "surrogatepass")


def image_uid(image_id: str | bytes) -> int:
    """Stable non-negative 31-bit integer for an image id (sha256 of :func:`id_bytes`, platform independent)."""
    return int.from_bytes(hashlib.sha256(id_bytes(image_id)).digest()[:4], "little") & 0x7FFFFFFF


def uids(image_ids) -> np.ndarray:
    """``[B] int32`` uids for a list of image ids."""
    return np.asarray([image_uid(i) for i in image_ids], dtype=np.int32)


def base_key(seed: int) -> jax.Array:
    """Typed base key for a run; the seed is always explicit (no random default)."""
    return jax.random.key(int(seed))


def image_keys(base: jax.Array, uid: jax.Array, step) -> jax.Array:
    """Per-image keys ``[B]`` for one optimisation step: fold_in(fold_in(base, uid), step).

    Args:
      base: typed scalar key.
      uid: ``[B] int32`` image uids.
      step: scalar int (traced or static), the global iteration number.
    """
    step = jnp.asarray(step, jnp.uint32)
    return jax.vmap(lambda u: jax.random.fold_in(jax.random.fold_in(base, u), step))(
        jnp.asarray(uid).astype(jnp.uint32)
    )


def split_named(key: jax.Array, *names: str) -> dict:
    """Split one key into named sub-keys (stable: the name, not the order of use, picks the stream)."""
    return {n: jax.random.fold_in(key, image_uid(n)) for n in names}
