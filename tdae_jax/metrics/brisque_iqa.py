"""BRISQUE, a no-reference image quality score (Mittal, Moorthy & Bovik, "No-Reference Image Quality Assessment in
the Spatial Domain", IEEE TIP 2012), from the PyPI package ``brisque`` (rehanguha/brisque ``brisque/brisque.py``,
the package Anti-DreamBooth's ``evalutions/brisques.py`` calls as ``BRISQUE(url=False).score(img)``).

The package ships its model offline: the LIBSVM regressor ``brisque/models/svm.txt`` and the feature ranges
``normalize.pickle`` (trained on LIVE IQA). Lower is better; natural photos score roughly 0-40, heavy noise or
blur 50-100+ (the scale is the LIVE DMOS scale, not bounded).

What is used from the package: its 18 features per scale (``BRISQUE.calculate_brisque_features``: MSCN
coefficients and their four pairwise products, fitted with asymmetric generalized Gaussians), on the grey image
(``skimage.color.rgb2gray``) and on its half-size bicubic copy (``cv2.resize(..., INTER_CUBIC)``), exactly as
``BRISQUE.score`` does, and its model files. What is restated here: the last three lines of ``BRISQUE.score``
(scale the 36 features to [-1, 1] with the pickled ranges, then ``svm_predict_probability``), because they fail
with the current releases of the package's own dependencies: 0.0.16 reads ``svmutil.PRECOMPUTED``, which
libsvm-official >= 3.30 moved into the ``kernel_names`` enum, and 0.2.0 calls ``float()`` on 1-element arrays,
which numpy 2 refuses. The restated lines feed the same numbers to the same LIBSVM call.

A flat image (no texture: the features divide by zero) has no score: :func:`score` returns None.
"""
from __future__ import annotations

import functools
import importlib
import warnings

import numpy as np

INSTALL = 'pip install -e ".[faces]"'


class BrisqueUnavailable(RuntimeError):
    """The ``brisque`` package or one of its dependencies (opencv, libsvm-official) is missing."""


@functools.lru_cache(maxsize=1)
def _model():
    """``(BRISQUE object, feature minima [36], maxima [36])``; :class:`BrisqueUnavailable` when it cannot load."""
    try:
        for dep in ("cv2", "libsvm.svmutil"):  # the package's resize and regressor
            importlib.import_module(dep)
        from brisque import BRISQUE
    except ImportError as e:
        raise BrisqueUnavailable(f"BRISQUE needs the brisque package ({INSTALL}: brisque, opencv-python, "
                                 f"libsvm-official; missing: {e.name or e})") from e
    obj = BRISQUE(url=False)
    if obj.model is None:
        raise BrisqueUnavailable("brisque: its model file svm.txt could not be loaded (reinstall the package)")
    lo = np.asarray(obj.scale_params["min_"], np.float64)
    hi = np.asarray(obj.scale_params["max_"], np.float64)
    return obj, lo, hi


def check_available() -> None:
    """Raise :class:`BrisqueUnavailable` (one line naming the install command) unless BRISQUE loads."""
    _model()


def available() -> bool:
    try:
        _model()
        return True
    except BrisqueUnavailable:
        return False


def _flat(features) -> np.ndarray:
    """The package's object array (scalars and 1-element arrays) as float64."""
    return np.array([float(np.ravel(np.asarray(f, np.float64))[0]) for f in features], np.float64)


def features(image_uint8: np.ndarray) -> np.ndarray:
    """The 36 BRISQUE features ``[36]`` of an ``[H,W,3]`` (or ``[H,W]``) uint8 image, as ``BRISQUE.score``."""
    import cv2
    import skimage.color

    obj, _, _ = _model()
    img = np.asarray(image_uint8)
    grey = skimage.color.rgb2gray(img[..., :3]) if img.ndim == 3 else img.astype(np.float64) / 255.0
    half = cv2.resize(grey, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
    with warnings.catch_warnings():  # a textureless region divides by zero: NaN features, no score
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.concatenate([_flat(obj.calculate_brisque_features(grey, kernel_size=7, sigma=7 / 6)),
                               _flat(obj.calculate_brisque_features(half, kernel_size=7, sigma=7 / 6))])


def score(image_uint8: np.ndarray) -> float | None:
    """BRISQUE of one image (lower = better quality); None when the features are undefined (a flat image)."""
    from libsvm import svmutil

    obj, lo, hi = _model()
    f = features(image_uint8)
    if not np.all(np.isfinite(f)):
        return None
    scaled = -1.0 + 2.0 / (hi - lo) * (f - lo)
    x, _ = svmutil.gen_svm_nodearray([float(v) for v in scaled])
    prob = (svmutil.c_double * 1)()
    value = float(svmutil.libsvm.svm_predict_probability(obj.model, x, prob))
    return value if np.isfinite(value) else None
