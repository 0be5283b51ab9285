"""Generated from protos/fedtune/registry/v1/registry.proto by grpcio-tools (do not edit)."""
