"""One APIRouter per API surface; the ingress includes them all."""
