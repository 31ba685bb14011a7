"""Ray Serve application: a gRPC ingress over one model deployment per model name.

- `ingress.py`   the gRPC methods: validation, status codes, health; no torch here.
- `classifier.py` the model deployment: follows a registry channel, batches requests;
                  no grpc here.
- `validation.py` request messages -> checked domain values.
- `app.py`       builds the application and starts Serve with its gRPC proxy.
"""
