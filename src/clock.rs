//! Time, injected: the only place that reads the system clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// A source of wall-clock time; tests may substitute a fixed one.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    fixed: Option<u64>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock { fixed: None }
    }

    /// A clock frozen at `secs` since the Unix epoch.
    pub fn fixed(secs: u64) -> Clock {
        Clock { fixed: Some(secs) }
    }

    /// Milliseconds since the Unix epoch.
    pub fn unix_millis(&self) -> i64 {
        #[allow(clippy::disallowed_methods)]
        let ms = match self.fixed {
            Some(s) => u128::from(s) * 1000,
            None => SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0),
        };
        i64::try_from(ms).unwrap_or(i64::MAX)
    }

    /// Seconds since the Unix epoch.
    pub fn unix_secs(&self) -> u64 {
        #[allow(clippy::disallowed_methods)]
        self.fixed.unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
    }
}

/// `secs` since the Unix epoch as an RFC 3339 UTC time (`2026-11-23T12:45:49Z`).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_437_949), "2026-11-23T12:45:49Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
