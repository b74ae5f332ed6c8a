"""What every service (gateway, prefill and decode workers) shares: gRPC plumbing and the one
place domain errors become status codes, authentication and TLS, request ids and logs,
metrics, proto <-> engine conversions, and the worker session. It sits above ``engine`` and
below the services; ``pdmesh`` (CLI, launcher, bench) is above them all."""
