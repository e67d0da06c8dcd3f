//! Reading durations and sizes as operators write them (`500ms`, `8MiB`). A leaf: settings,
//! policies and the CLI all parse with it.

use std::time::Duration;

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 15m, 24h)"))
}

/// A size in bytes: a whole number with an optional KiB, MiB or GiB suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let multiplier: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err("expected a size such as 0, 512KiB, 8MiB or 1GiB".into()),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| "expected a size such as 0, 512KiB, 8MiB or 1GiB".into())
}
