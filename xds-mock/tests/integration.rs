//! xds-mock integration tests: real gRPC over loopback against in-process servers (one test binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cases;
mod common;
