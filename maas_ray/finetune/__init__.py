"""Fine-tuning as a service: uploaded files, jobs, and the job driver.

``files`` and ``jobs`` are what the HTTP API and the CLI call (no torch);
``runner`` is the Ray job that trains through :mod:`maas_ray.train.finetune`.
"""
