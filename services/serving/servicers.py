"""Registering tuneserve's gRPC services on a server: Serve's gRPC proxy (through
`grpc_servicer_functions`) and the per-replica servers alike. Requests are decoded
leniently: bytes that do not parse reach the ingress as an UndecodableRequest, which
it refuses with INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from services.protocol import admin_pb, pb
from services.serving import serve_logs
from services.serving.validation import UndecodableRequest


def _lenient(message_class):
    """A request deserializer that never raises: bytes it cannot parse become an
    UndecodableRequest for the ingress to refuse."""

    def deserialize(raw: bytes):
        try:
            return message_class.FromString(raw)
        except DecodeError:
            return UndecodableRequest(message_class.DESCRIPTOR.full_name, len(raw))

    return deserialize


def _register(service, servicer, server) -> None:
    """What a generated `add_*Servicer_to_server` does, with lenient deserializers."""
    handlers = {}
    for method in service.methods:
        fn = getattr(servicer, method.name, None)
        if fn is None:  # a method the servicer lacks stays UNIMPLEMENTED
            continue
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        handlers[method.name] = make(fn,
                                     request_deserializer=_lenient(request),
                                     response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(service.full_name, handlers)


def add_inference_servicer(servicer, server) -> None:
    serve_logs.install()  # in Serve's proxy, which calls this at start
    _register(pb.DESCRIPTOR.services_by_name["Inference"], servicer, server)


def add_admin_servicer(servicer, server) -> None:
    _register(admin_pb.DESCRIPTOR.services_by_name["Admin"], servicer, server)


def add_health_servicer(servicer, server) -> None:
    _register(health_pb2.DESCRIPTOR.services_by_name["Health"], servicer, server)


GRPC_SERVICER_FUNCTIONS = [f"{__name__}.{fn.__name__}" for fn in
                           (add_inference_servicer, add_health_servicer)]
"""Import paths for `gRPCOptions.grpc_servicer_functions` (Serve config files too);
services.protocol.SERVICER_FUNCTIONS names the same (checked by a test). Not the
Admin service: it is served on the admin port only (replica_grpc.py)."""
