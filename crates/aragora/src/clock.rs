//! Wall-clock time as the API shows it: microseconds since the epoch inside,
//! `YYYY-MM-DDTHH:MM:SSZ` outside (jq's `fromdateiso8601` rejects fractions).

use std::time::{SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;
use time::macros::format_description;

/// Microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// `2026-11-24T19:54:08Z` for a time in microseconds since the epoch.
pub fn format_us(us: i64) -> String {
    let fmt = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    OffsetDateTime::from_unix_timestamp(us.div_euclid(1_000_000))
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

/// `format_us` for optional times.
pub fn format_opt(us: Option<i64>) -> Option<String> {
    us.map(format_us)
}

/// Parses a duration such as `90s`, `15m`, `1h`, `24h`, `7d` (humantime syntax),
/// naming the field when it does not parse.
pub fn parse_duration(field: &str, value: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(value.trim())
        .map_err(|e| format!("{field}: {value:?} is not a duration like 30m, 1h or 24h ({e})"))?;
    if d.is_zero() {
        return Err(format!("{field}: duration must be greater than zero"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_whole_seconds_utc() {
        assert_eq!(format_us(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_us(1_764_000_000_123_456), "2025-11-24T16:00:00Z");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("d", "1h").expect("1h").as_secs(), 3600);
        assert_eq!(parse_duration("d", "24h").expect("24h").as_secs(), 86400);
        assert!(
            parse_duration("duration", "soon")
                .expect_err("bad")
                .contains("duration")
        );
        assert!(parse_duration("d", "0s").is_err());
    }
}
