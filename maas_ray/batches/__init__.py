"""The Batch API (``/v1/batches``): JSONL files of requests run as Ray jobs over Ray Data,
through the same engines as the online service."""
