//! Times on the command line: RFC 3339 or Unix seconds in, RFC 3339 UTC with milliseconds out.

/// Why a time could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not an RFC 3339 time (2026-11-23T10:00:00Z), a date (2026-11-23) or Unix seconds")]
pub struct BadTime(pub String);

/// Unix milliseconds as `2026-11-23T12:45:49.123Z`.
pub fn format_ms(ms: i64) -> String {
    let whole = crate::clock::rfc3339(ms.div_euclid(1000));
    let base = whole.strip_suffix('Z').unwrap_or(&whole);
    format!("{base}.{:03}Z", ms.rem_euclid(1000))
}

/// Unix milliseconds from `1795437949` (seconds), `2026-11-23` (midnight UTC) or an RFC 3339
/// time with an optional fraction and a `Z` or `±HH:MM` offset.
pub fn parse_ms(text: &str) -> Result<i64, BadTime> {
    let bad = || BadTime(text.to_owned());
    let t = text.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse::<i64>().ok().and_then(|s| s.checked_mul(1000)).ok_or_else(bad);
    }
    let b = t.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let s = t.get(from..from + len)?;
        s.bytes().all(|c| c.is_ascii_digit()).then(|| s.parse().ok()).flatten()
    };
    let (year, month, day) = (num(0, 4).ok_or_else(bad)?, num(5, 2).ok_or_else(bad)?, num(8, 2).ok_or_else(bad)?);
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') || !(1..=12).contains(&month) {
        return Err(bad());
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err(bad());
    }
    let midnight = days_from_civil(year, month, day) * 86_400_000;
    if b.len() == 10 {
        return Ok(midnight);
    }
    if !matches!(b.get(10), Some(b'T' | b't' | b' ')) || b.get(13) != Some(&b':') || b.get(16) != Some(&b':') {
        return Err(bad());
    }
    let (h, m, s) = (num(11, 2).ok_or_else(bad)?, num(14, 2).ok_or_else(bad)?, num(17, 2).ok_or_else(bad)?);
    if h > 23 || m > 59 || s > 60 {
        return Err(bad());
    }
    let mut i = 19;
    let mut millis = 0;
    if b.get(i) == Some(&b'.') {
        let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return Err(bad());
        }
        // Keep milliseconds; finer digits are dropped.
        millis = b[i + 1..i + 1 + digits.min(3)].iter().fold(0, |acc, c| acc * 10 + i64::from(c - b'0'));
        millis *= [100, 10, 1][digits.min(3) - 1];
        i += 1 + digits;
    }
    let offset_min = match &b[i..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), ..] if b.len() == i + 6 && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1, 2).ok_or_else(bad)?, num(i + 4, 2).ok_or_else(bad)?);
            if oh > 23 || om > 59 {
                return Err(bad());
            }
            if *sign == b'+' { oh * 60 + om } else { -(oh * 60 + om) }
        }
        _ => return Err(bad()),
    };
    Ok(midnight + ((h * 60 + m - offset_min) * 60 + s) * 1000 + millis)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}
