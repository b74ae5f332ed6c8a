"""The public gRPC API: validation, tokenization, routing, streaming back."""
