"""API keys, tenants, rate limits, token budgets and usage metering.

Keys live in the project database (:mod:`maas_ray.db`) only as salted hashes;
limits are counted there too, so they hold across every ingress replica.
"""

from maas_ray.auth.keys import (ApiKey, AuthError, Denied, KeyStore, RateLimit, parse_rate,
                                split_key)

__all__ = ["ApiKey", "AuthError", "Denied", "KeyStore", "RateLimit", "parse_rate", "split_key"]
