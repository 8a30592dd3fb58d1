//! Compiles the management API (`proto/xds_mock/v1/management.proto` at the workspace root) with protox, so no
//! system protoc is needed, and generates its tonic server and client; the descriptor set is kept for reflection.

use std::path::PathBuf;

use anyhow::{Context, Result};
use prost::Message;

const MANAGEMENT_PROTO: &str = "xds_mock/v1/management.proto";

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // The proto folder is shared with the proxy (its build compiles every file there into its pool too).
    let proto_root = manifest_dir.join("..").join("proto");
    let proto_file = proto_root.join(MANAGEMENT_PROTO);
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", proto_file.display());

    let fds = protox::compile([MANAGEMENT_PROTO], [&proto_root])
        .with_context(|| format!("compiling {}", proto_file.display()))?;
    let descriptor_file = out_dir.join("xds_mock_descriptor.bin");
    std::fs::write(&descriptor_file, fds.encode_to_vec())
        .with_context(|| format!("writing {}", descriptor_file.display()))?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)
        .context("generating the management API code")?;
    Ok(())
}
