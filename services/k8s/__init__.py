"""Kubernetes: training runs as KubeRay RayJobs, version pins on the RayService.

    tuneserve k8s train --config run.yaml --watch
    tuneserve k8s promote sentiment v3

The manifests live in k8s/ (kustomize base + cpu/gpu overlays); this package builds the
per-run objects (services.k8s.objects, no cluster needed), talks to the API server
(services.k8s.client) and adds the `k8s` commands (services.k8s.cli). See
docs/kubernetes.md.
"""

from services.k8s.cli import register, run

__all__ = ["register", "run"]
