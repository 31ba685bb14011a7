"""Serve autoscaling of colocated ingress replicas that answer gRPC themselves
(ServeConfig.colocate with replica_grpc).

Serve's autoscaler counts the requests that reach a replica through Serve (its proxy or
a DeploymentHandle); the calls a replica's own gRPC server answers never do. Each such
replica reports the calls its servers are answering as a custom autoscaling metric
(`record_autoscaling_stats`, OWN_CALLS), and `own_servers_policy`, the deployment's
autoscaling policy, adds them to what Serve counts and applies Serve's own rule:
replicas = ongoing calls / target_ongoing_requests. Serve applies min/max_replicas,
the scaling factors and the up/down delays around it, as for its default policy.
"""

from __future__ import annotations

from typing import Any

OWN_CALLS = "tuneserve_own_server_calls"
"""The custom metric: calls a replica's own gRPC servers are answering."""
POLICY = "services.serving.autoscale:own_servers_policy"
"""The import path Serve's controller loads the policy from."""


def own_servers_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Desired replicas for a ray.serve.config.AutoscalingContext: the calls Serve saw
    plus those the replicas' own servers answered (each averaged over Serve's look-back
    window), over the target per replica."""
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    metrics = ctx.aggregated_metrics or {}
    ongoing = ctx.total_num_requests + sum(metrics.get(OWN_CALLS, {}).values())
    return ongoing / ctx.config.get_target_ongoing_requests(), {}
