"""tuneserve: fine-tune language models with Ray Train, serve them over gRPC with Ray Serve."""

__version__ = "0.1.0"
