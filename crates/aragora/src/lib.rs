//! aragora: the security control plane over HTTP, built on aedb.
//!
//! This crate currently holds the foundation of the service (issue #7): validated
//! configuration, the metrics registry, the embedded store opened securely, the
//! HTTP router with health, metrics and maintenance mode. Authentication, RBAC,
//! audit search, encryption and approvals build on it.

pub mod admission;
pub mod api;
pub mod app;
pub mod approvals;
pub mod audit;
pub mod auth;
pub mod backup;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod control;
pub mod crypto;
pub mod drill;
pub mod encryption;
pub mod error;
pub mod jobs;
pub mod keys;
pub mod maintenance;
pub mod metrics;
pub mod net;
pub mod operator;
pub mod rbac;
pub mod redis_link;
pub mod secrets;
pub mod store;
pub mod tls;
