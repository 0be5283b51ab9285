"""The model registry over gRPC: the on-disk store, the service, and the coordinator's
publisher. The wire format is `protos/fedtune/registry/v1/registry.proto`; its generated
stubs live in `fedtune/registry/v1/` (regenerate with `make protos`)."""
