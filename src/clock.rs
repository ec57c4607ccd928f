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

    /// Seconds since the Unix epoch.
    pub fn unix_secs(&self) -> u64 {
        #[allow(clippy::disallowed_methods)]
        self.fixed.unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
    }
}
