//! xds-mock: a real xDS control plane (ADS over gRPC, SotW and delta) that serves Envoy-format YAML and can be
//! changed at runtime. The server itself is built in the xDS issue; this crate holds its place in the workspace.
