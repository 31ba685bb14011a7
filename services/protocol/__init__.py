"""The wire protocol: generated protobuf / gRPC modules for `tuneserve.v1`.

Import the messages from here, not from the generated modules, so that the layout of
generated code can change without touching callers.
"""

from services.protocol.tuneserve.v1 import admin_pb2 as admin_pb
from services.protocol.tuneserve.v1 import admin_pb2_grpc as admin_pb_grpc
from services.protocol.tuneserve.v1 import inference_pb2 as pb
from services.protocol.tuneserve.v1 import inference_pb2_grpc as pb_grpc

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
ADMIN_SERVICE = admin_pb.DESCRIPTOR.services_by_name["Admin"].full_name

# Import paths of the functions that Ray Serve's gRPC proxy calls to register the
# services (`gRPCOptions.grpc_servicer_functions`, in Serve configs and the RayService).
# They are services/serving/app.py's versions of the generated `add_*Servicer_to_server`,
# with deserializers that never raise, so that a malformed message gets
# INVALID_ARGUMENT instead of UNKNOWN. The health service is routed through the proxy
# like any other, so Kubernetes' native gRPC probe reaches the app. The Admin service is
# not among them: it has a port of its own (ServeConfig.admin_port).
SERVICER_FUNCTIONS = [
    "services.serving.servicers.add_inference_servicer",
    "services.serving.servicers.add_health_servicer",
]

__all__ = ["pb", "pb_grpc", "admin_pb", "admin_pb_grpc", "INFERENCE_SERVICE", "ADMIN_SERVICE",
           "SERVICER_FUNCTIONS"]
