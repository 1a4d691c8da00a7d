"""maas_ray: Model-as-a-Service on Ray.

Stages, each a sub-package: ``config`` (specs) → ``data`` (Ray Data) → ``train``
(Ray Train) → ``registry`` (versioned models) → ``serve`` (Ray Serve). The ``maas``
CLI (``maas_ray.cli``) is a thin face over them.
"""

__version__ = "0.1.0"
