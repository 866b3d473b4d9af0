"""tdae_jax: image immunization against diffusion editing and customization, in JAX/Flax.

Install:  pip install -e .            (CPU)
          pip install -e ".[test]"     (test runner, reference metrics)
          pip install -e ".[parity]"   (torch CPU, only for the PyTorch reference checks)
          pip install -e ".[gpu]" / ".[tpu]"
"""
from setuptools import find_packages, setup

JAX = "0.10.2"

setup(
    name="tdae_jax",
    version="0.1.0",
    description="Transferable defenses against malicious diffusion edits (TDAE) and customization (DLADiff) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["tdae_jax", "tdae_jax.*", "experiments", "experiments.*"]),
    package_data={
        "tdae_jax": ["assets/samples/*", "assets/miniature/**/*", "miniature/immunizer/*"],
        "experiments": ["flags/*.flags"],
    },
    include_package_data=True,
    install_requires=[
        f"jax=={JAX}",
        f"jaxlib=={JAX}",
        "flax==0.12.8",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "chex>=0.1.90,<0.2",
        "absl-py>=2.1,<3",
        "numpy>=1.26,<3",
        "pillow>=10.0,<14",
        "safetensors>=0.4,<1",
        "diffusers==0.39.0",
        "transformers==4.57.6",
        "huggingface-hub<1.0",
        "matplotlib>=3.8,<4",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "scikit-image>=0.22,<0.27"],
        "parity": ["torch==2.13.0"],
        # dlib's face pipeline (layer 2, ISM / FDR), ONNX ArcFace encoders, and BRISQUE for
        # experiments.evaluate_customization (brisque ships its LIBSVM model; tdae_jax/metrics/brisque_iqa.py
        # restates the scoring lines that libsvm-official >= 3.30 broke in brisque 0.0.16)
        "faces": ["dlib-bin>=20,<21", "face-recognition-models==0.3.0", "onnx>=1.16,<2", "onnxruntime>=1.17,<2",
                  "brisque==0.0.16", "libsvm-official>=3.30,<4"],
        "gpu": [f"jax[cuda12]=={JAX}"],
        "tpu": [f"jax[tpu]=={JAX}"],
    },
)
