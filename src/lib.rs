//! auth-sidecar: a gRPC token service that runs beside an application in its pod.
//!
//! Layers, one direction: `grpc` (wire types, statuses) and `http` (forward-auth, OAuth) →
//! `authz` (the one access decision) → `tokens`, `sessions`, `ratelimit` (the rules; `keys` for
//! signing) → `store` (state every node agrees on). `ops` and `health`
//! serve what the cluster sees; `telemetry` logs, traces and counts; `server` composes it
//! all; `cluster` compares this node with the other live ones, and `check` prints the
//! multi-node checklist; `client` is the binary's client side. See ARCHITECTURE.md.

pub mod admin;
pub mod authz;
pub mod check;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod grpc;
pub mod health;
pub mod http;
pub mod ids;
pub mod keys;
pub mod mfa;
pub mod ops;
pub mod pb;
pub mod ratelimit;
pub mod rules;
pub mod secret;
pub mod server;
pub mod sessions;
pub mod store;
pub mod telemetry;
pub mod tokens;
pub mod units;
