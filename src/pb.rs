//! The generated wire types of `proto/`, included once. Only the gRPC layer (`grpc`, `client`)
//! uses them; the domain never does.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("authsidecar.v1");

/// The encoded descriptors of `proto/`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/authsidecar_descriptor.bin"));

/// The encoded descriptors of Envoy's ext_authz and rate limit services and what they import,
/// picked out of `envoy-types` by the build script, for server reflection.
pub const ENVOY_FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptor.bin"));
