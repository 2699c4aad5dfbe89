"""Data functions, one module per resource: each takes the request's session,
queries through the caller's rights, returns typed rows, and never commits."""
