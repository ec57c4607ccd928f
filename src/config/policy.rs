//! `[policy]`: where the Cedar policies live (`policy`, `docs/policy.md`). Without this
//! section the built-in rule is in force: every authenticated caller may use everything its
//! token allows.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// `[policy]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// The folder of `.cedar` files (relative to the working directory). Required.
    pub dir: Option<String>,
    /// How often the folder is checked for changes. Default `"2s"`.
    pub reload_interval: Option<String>,
    /// The offset of `context.time`'s hour, minute and weekday from UTC, as `"+01:00"` or
    /// `"-05:30"`. Default `"+00:00"`.
    pub utc_offset: Option<String>,
}

/// Validated `[policy]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    /// The folder of `.cedar` files.
    pub dir: PathBuf,
    /// How often the folder is checked for changes.
    pub reload_interval: Duration,
    /// `context.time`'s offset from UTC, in minutes.
    pub utc_offset_minutes: i32,
}

impl RawPolicy {
    /// The validated section, or its problems.
    pub fn validate(self) -> Result<PolicyConfig, Vec<String>> {
        let mut problems = Vec::new();
        let dir = match self.dir.filter(|d| !d.trim().is_empty()) {
            Some(d) => PathBuf::from(d),
            None => {
                problems.push("policy.dir is required: the folder of .cedar policy files".to_owned());
                PathBuf::new()
            }
        };
        let text = self.reload_interval.unwrap_or_else(|| "2s".to_owned());
        let reload_interval = match super::parse_duration(&text) {
            Some(d) if d >= Duration::from_millis(100) => d,
            _ => {
                problems.push(format!("policy.reload_interval: {text:?} is not a duration of at least 100ms"));
                Duration::from_secs(2)
            }
        };
        let text = self.utc_offset.unwrap_or_else(|| "+00:00".to_owned());
        let utc_offset_minutes = offset_minutes(&text).unwrap_or_else(|| {
            problems.push(format!("policy.utc_offset: {text:?} is not an offset like \"+01:00\" or \"-05:30\""));
            0
        });
        if problems.is_empty() { Ok(PolicyConfig { dir, reload_interval, utc_offset_minutes }) } else { Err(problems) }
    }
}

/// `+HH:MM` / `-HH:MM` (up to ±18:00) in minutes.
fn offset_minutes(text: &str) -> Option<i32> {
    let (sign, rest) = match text.as_bytes().first()? {
        b'+' => (1, &text[1..]),
        b'-' => (-1, &text[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 18 && m < 60 && h * 60 + m <= 18 * 60).then_some(sign * (h * 60 + m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_read_as_minutes() {
        assert_eq!(offset_minutes("+01:00"), Some(60));
        assert_eq!(offset_minutes("-05:30"), Some(-330));
        assert_eq!(offset_minutes("+00:00"), Some(0));
        assert_eq!(offset_minutes("01:00"), None);
        assert_eq!(offset_minutes("+19:00"), None);
        assert_eq!(offset_minutes("+1:00"), None);
    }
}
