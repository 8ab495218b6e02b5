//! Compiles `burrow/v1/*.proto` with `protox` (pure Rust, so no system `protoc` is needed) and
//! generates prost messages and tonic clients and servers from the descriptors.

use std::path::PathBuf;

const PROTO_FILES: &[&str] = &[
    "burrow/v1/common.proto",
    "burrow/v1/account.proto",
    "burrow/v1/team.proto",
    "burrow/v1/token.proto",
    "burrow/v1/reservation.proto",
    "burrow/v1/edge.proto",
    "burrow/v1/tunnel.proto",
    "burrow/v1/agent.proto",
    "burrow/v1/usage.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(PROTO_FILES, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("burrow_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
