"""Generated gRPC stubs; regenerate with `python -m service.protogen`, never edit by hand."""
