//! The gateway's one reading of the wall clock for records and replies
//! (filters that decide by time take a `filters::Clock`).

use filters::Clock;

/// Now, as records write it: RFC 3339, UTC, milliseconds.
pub fn timestamp() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    filters::SystemClock.now_secs()
}
