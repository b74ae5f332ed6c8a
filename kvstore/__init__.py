"""The shared paged KV store: block identity, index and data planes."""
