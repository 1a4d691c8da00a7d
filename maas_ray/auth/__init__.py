"""API keys, tenants, rate limits, token budgets and usage metering.

Keys live in the project database (:mod:`maas_ray.db`) only as salted hashes.
Rate windows and usage are counted in each process's memory and settled with that
database in batches (:mod:`.ledger`), so limits hold across ingress replicas within
the tolerances stated there.
"""

from maas_ray.auth.keys import (ApiKey, AuthError, Denied, KeyStore, RateLimit, parse_rate,
                                split_key)

__all__ = ["ApiKey", "AuthError", "Denied", "KeyStore", "RateLimit", "parse_rate", "split_key"]
