"""The core layer: what training, serving and the tools on top all stand on.

Errors and their status codes, typed configuration, metrics names, data reading,
model loading, the registry of published versions, network and Ray-cluster helpers.
Nothing here imports `services.training`, `services.serving` or anything above them.
"""
