//! A test kit that runs the real `aragora serve` binary on port 0 with a fresh
//! data directory (reading the bound address back from the server), bootstraps
//! an admin through the real CLI, and speaks HTTP to it through hyper's client.
//! With the `store` feature it also holds the behaviour every `Store` backend
//! must have (`store::suite`) and the record builders those tests use.

pub mod http;
pub mod scenario;
pub mod server;
#[cfg(feature = "store")]
pub mod store;

pub use http::{Client, HttpError, Request, Response};
pub use scenario::Scenario;
pub use serde_json::{Value, json};
pub use server::{BootFailure, Server, Shared, base_env};

/// The value of one series in a Prometheus text exposition (0 when absent).
pub fn metric_value(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}
