"""The model registry over gRPC: the on-disk store, the service, the publish token and
the coordinator's publisher. The wire format is `protos/fedtune/registry/v1/registry.proto`;
its generated stubs live in `registry/v1/` (import name `fedtune.registry.v1`; regenerate
with `make protos`), and `protocol.py` holds the limits and name rules devices share."""
