"""gRPC service around an engine in the decode role."""
