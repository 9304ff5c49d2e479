//! aragora: the security control plane over HTTP, built on aedb.
//!
//! This crate currently holds the foundation of the service (issue #7): validated
//! configuration, the metrics registry, the embedded store opened securely, the
//! HTTP router with health, metrics and maintenance mode. Authentication, RBAC,
//! audit search, encryption and approvals build on it.

pub mod app;
pub mod config;
pub mod crypto;
pub mod keys;
pub mod metrics;
