"""Serve's records of a call ended by a caller's mistake: one INFO line, no traceback,
in the ingress and model replicas and in the proxy; faults keep theirs."""

from __future__ import annotations

import logging
import pickle
import sys

import grpc
import pytest
from ray.serve.exceptions import gRPCStatusError

from services.core.errors import InvalidInput, ModelNotFound, TuneserveError
from services.serving import serve_logs
from services.serving.serve_logs import QuietClientErrors, StreamEnded


def record_of(exc: BaseException, message: str = "Request failed.") -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        info = sys.exc_info()
    return logging.LogRecord("ray.serve", logging.ERROR, __file__, 1, message, (), info)


def test_a_callers_mistake_becomes_one_info_line():
    quiet = QuietClientErrors()
    replica = record_of(StreamEnded(grpc.StatusCode.INVALID_ARGUMENT, "top_p: must be in (0, 1]"))
    proxy = record_of(gRPCStatusError(RuntimeError("x"), grpc.StatusCode.NOT_FOUND,
                                      "model 'nope' not found"),
                      "Request failed with user-set gRPC status code NOT_FOUND.")
    for record, line in ((replica, "call ended with INVALID_ARGUMENT: top_p: must be in "
                                   "(0, 1]"),
                         (proxy, "call ended with NOT_FOUND: model 'nope' not found")):
        assert quiet.filter(record)
        assert record.levelno == logging.INFO and record.exc_info is None
        assert record.getMessage() == line
        assert "Traceback" not in logging.Formatter().format(record)


@pytest.mark.parametrize("exc, line", [
    (InvalidInput("prompt: 256 tokens; the model's context is 256 tokens"),
     "call ended with INVALID_ARGUMENT: prompt: 256 tokens; the model's context is 256 "
     "tokens"),
    (ModelNotFound("model 'toy' has no version 'v9'"),
     "call ended with NOT_FOUND: model 'toy' has no version 'v9'"),
])
def test_a_callers_mistake_found_in_a_model_replica_is_one_info_line(exc, line):
    record = record_of(exc)
    assert QuietClientErrors().filter(record)
    assert record.levelno == logging.INFO and record.exc_info is None
    assert record.getMessage() == line


@pytest.mark.parametrize("exc", [
    StreamEnded(grpc.StatusCode.INTERNAL, "internal error (id 1)"),
    gRPCStatusError(RuntimeError("boom"), grpc.StatusCode.UNKNOWN, "boom"),
    RuntimeError("a real fault"),
    TuneserveError("a fault of ours"),
])
def test_faults_keep_their_traceback(exc):
    record = record_of(exc)
    assert QuietClientErrors().filter(record)
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "Traceback" in logging.Formatter().format(record)


def test_installed_once_on_serves_logger_and_travels_between_processes():
    from services.serving.servicers import add_inference_servicer

    class Server:  # what Serve's proxy passes to the servicer functions
        def add_generic_rpc_handlers(self, handlers):
            pass

    logger = logging.getLogger(serve_logs.SERVE_LOGGER)
    before = list(logger.filters)
    try:
        logger.filters[:] = [f for f in before if not isinstance(f, QuietClientErrors)]
        add_inference_servicer(object(), Server())  # in the proxy process
        serve_logs.install()  # and again in an ingress replica: still one
        assert sum(isinstance(f, QuietClientErrors) for f in logger.filters) == 1
    finally:
        logger.filters[:] = before
    again = pickle.loads(pickle.dumps(StreamEnded(grpc.StatusCode.NOT_FOUND, "gone")))
    assert again.code == grpc.StatusCode.NOT_FOUND and again.message == "gone"
    assert again.grpc_code == "NOT_FOUND"
