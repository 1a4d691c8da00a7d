"""The web console's static assets (``static/``), served by :mod:`maas_ray.serve.routes.console`."""
