"""Ray Serve application: a gRPC ingress over one model deployment per model name.

- `ingress.py`    the gRPC methods: validation, status codes, health; no torch here.
- `follower.py`   what every model deployment shares: following a registry channel or
                  pin, verifying, loading, swapping versions; no grpc here.
- `classifier.py` the classification deployment: batches requests (batching.py).
- `generator.py`  the generation deployment: batched generate with per-request
                  sampling, streaming, cancellation (services/runtime/generation.py).
- `validation.py` request messages -> checked domain values.
- `app.py`        builds the application and starts Serve with its gRPC proxy.
"""
