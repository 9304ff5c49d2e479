//! A test kit that runs the real `aragora serve` binary on port 0 with a fresh
//! data directory (reading the bound address back from the server), bootstraps
//! an admin through the real CLI, and speaks HTTP to it through hyper's client.
//! With the `store` feature it also holds the behaviour every `Store` backend
//! must have (`store::suite`) and the record builders those tests use.

pub mod http;
pub mod postgres;
pub mod scenario;
pub mod server;
#[cfg(feature = "store")]
pub mod store;

pub use http::{Client, HttpError, Request, Response};
pub use scenario::Scenario;
pub use serde_json::{Value, json};
pub use server::{BootFailure, Server, Shared, base_env, env_refs, production_env};

/// The value of a series in a Prometheus text exposition (0 when absent):
/// `name` or `name{label="value",...}`, where the labels given are a subset
/// of the series' (as a PromQL selector): the values of every matching series
/// are summed, so `aragora_security_auth_failures_total{reason="expired"}`
/// counts that reason whatever its `method`.
pub fn metric_value(exposition: &str, series: &str) -> f64 {
    let (name, wanted) = parse_series(series);
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (s, value) = l.rsplit_once(' ')?;
            let (n, labels) = parse_series(s);
            (n == name && wanted.iter().all(|w| labels.contains(w)))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// A series' name and its `(label, value)` pairs, from `name{a="x",b="y"}`
/// (values may hold commas and escaped quotes).
pub fn parse_series(s: &str) -> (&str, Vec<(String, String)>) {
    let Some((name, rest)) = s.split_once('{') else {
        return (s.trim(), Vec::new());
    };
    let mut labels = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        let key: String = chars
            .by_ref()
            .skip_while(|c| *c == ',' || c.is_whitespace())
            .take_while(|c| *c != '=')
            .collect();
        if key.is_empty() || key.starts_with('}') || chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.extend(chars.next()),
                '"' => break,
                c => value.push(c),
            }
        }
        labels.push((key.trim().to_string(), value));
    }
    (name.trim(), labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_selector_sums_every_series_it_matches() {
        let text = "# TYPE x counter\n\
                    x{method=\"jwt\",reason=\"expired\"} 2\n\
                    x{method=\"api_key\",reason=\"expired\"} 3\n\
                    x{method=\"jwt\",reason=\"malformed\"} 5\n\
                    y{role=\"a,b\"} 7\n\
                    z 11\n";
        assert_eq!(metric_value(text, "x{reason=\"expired\"}"), 5.0);
        assert_eq!(
            metric_value(text, "x{method=\"jwt\",reason=\"malformed\"}"),
            5.0
        );
        assert_eq!(metric_value(text, "x"), 10.0);
        assert_eq!(metric_value(text, "y{role=\"a,b\"}"), 7.0);
        assert_eq!(metric_value(text, "z"), 11.0);
        assert_eq!(metric_value(text, "x{reason=\"missing\"}"), 0.0);
    }
}
