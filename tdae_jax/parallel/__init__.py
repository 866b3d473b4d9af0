"""Device meshes, shardings and the multi-host split."""
