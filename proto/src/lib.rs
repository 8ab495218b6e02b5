//! Every Burrow wire contract, generated from `proto/burrow/v1/*.proto`.
//!
//! # Layout
//! - [`v1`]: messages, tonic clients and servers of the gRPC API (`AccountService`,
//!   `TeamService`, `TokenService`, `ReservationService`, `TunnelService`, the internal
//!   `EdgeService`) and the agent↔edge handshake messages (`AgentHello`, `EdgeHello`).
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection.
//! - [`policy`]: the rules a tunnel policy must follow, shared by agent, CLI, control plane
//!   and edge.
//! - [`tunnel`]: the agent↔edge wire details that are not protobuf: handshake framing and the
//!   HTTP/2 header names both sides use.

/// Generated code of the `burrow.v1` package.
#[allow(unreachable_pub, clippy::all, missing_docs, rust_2018_idioms)]
pub mod v1 {
    tonic::include_proto!("burrow.v1");
}

/// Encoded `FileDescriptorSet` of every Burrow proto file, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/burrow_descriptor.bin"));

pub mod policy;
pub mod tunnel;
