//! The values a decision is made on, in Cedar's terms: a call's JSON arguments as a Cedar
//! record, and the clock as the `context.time` record.
//!
//! Cedar has no floats and no null (docs/policy.md, "Arguments"):
//! - `null` is left out, so `context.args has x` is false for it;
//! - a float with at most four decimal places within Cedar's decimal range becomes a
//!   `decimal` (`1.5` → `decimal("1.5")`), any other becomes its JSON text as a string;
//! - an integer beyond 64 bits becomes its text as a string.
//!
//! Nesting is bounded by the strict reading of the message (`protocol::jsonrpc`), so the
//! recursion here is too.

use cedar_policy::RestrictedExpression;
use serde_json::Value;

/// `value` as a Cedar value; `None` for `null`.
pub fn value(value: &Value) -> Option<RestrictedExpression> {
    Some(match value {
        Value::Null => return None,
        Value::Bool(b) => RestrictedExpression::new_bool(*b),
        Value::String(s) => RestrictedExpression::new_string(s.clone()),
        Value::Number(n) => match n.as_i64() {
            Some(i) => RestrictedExpression::new_long(i),
            None => number(n),
        },
        Value::Array(items) => RestrictedExpression::new_set(items.iter().filter_map(self::value)),
        Value::Object(map) => record(map),
    })
}

/// A JSON object as a Cedar record (its `null` members left out).
pub fn record(map: &serde_json::Map<String, Value>) -> RestrictedExpression {
    let pairs = map.iter().filter_map(|(k, v)| Some((k.clone(), value(v)?)));
    // Keys of a JSON object the strict reading accepted are distinct, so this cannot fail;
    // were it to, the empty record makes every rule on the arguments fail to match.
    RestrictedExpression::new_record(pairs).unwrap_or_else(|_| empty_record())
}

/// `{}`.
pub fn empty_record() -> RestrictedExpression {
    RestrictedExpression::new_record(std::iter::empty::<(String, RestrictedExpression)>())
        .unwrap_or_else(|_| RestrictedExpression::new_bool(false))
}

/// A number that is not a 64-bit integer: a decimal when Cedar can hold it exactly, else its
/// text.
fn number(n: &serde_json::Number) -> RestrictedExpression {
    let text = n.to_string();
    match decimal_text(&text) {
        Some(d) => RestrictedExpression::new_decimal(d),
        None => RestrictedExpression::new_string(text),
    }
}

/// Cedar's decimal: at most four digits after the point, within ±922337203685477.5807.
fn decimal_text(text: &str) -> Option<String> {
    if text.contains(['e', 'E']) {
        return None;
    }
    let (whole, frac) = text.split_once('.').unwrap_or((text, "0"));
    let frac = frac.trim_end_matches('0');
    if frac.len() > 4 || whole.trim_start_matches('-').len() > 15 {
        return None;
    }
    let digits = whole.trim_start_matches('-').parse::<i64>().ok()?;
    if digits > 922_337_203_685_477 {
        return None;
    }
    Some(format!("{whole}.{}", if frac.is_empty() { "0" } else { frac }))
}

/// `context.time`: the instant, and the local hour, minute and weekday after `offset_minutes`.
pub fn time(unix_millis: i64, offset_minutes: i32) -> RestrictedExpression {
    let whole = crate::clock::rfc3339(unix_millis.div_euclid(1000));
    let now = format!("{}.{:03}Z", whole.strip_suffix('Z').unwrap_or(&whole), unix_millis.rem_euclid(1000));
    let local_minutes = unix_millis.div_euclid(60_000) + i64::from(offset_minutes);
    let (days, minute_of_day) = (local_minutes.div_euclid(1440), local_minutes.rem_euclid(1440));
    let pairs = [
        ("now".to_owned(), RestrictedExpression::new_datetime(now)),
        ("hour".to_owned(), RestrictedExpression::new_long(minute_of_day / 60)),
        ("minute".to_owned(), RestrictedExpression::new_long(minute_of_day % 60)),
        // 1970-01-01 was a Thursday (4).
        ("weekday".to_owned(), RestrictedExpression::new_long((days + 3).rem_euclid(7) + 1)),
    ];
    RestrictedExpression::new_record(pairs).unwrap_or_else(|_| empty_record())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_become_decimals_when_cedar_can_hold_them() {
        assert_eq!(decimal_text("1.5").as_deref(), Some("1.5"));
        assert_eq!(decimal_text("-0.25").as_deref(), Some("-0.25"));
        assert_eq!(decimal_text("2.50000").as_deref(), Some("2.5"));
        assert_eq!(decimal_text("3").as_deref(), Some("3.0"));
        assert_eq!(decimal_text("0.123456"), None, "more than four places");
        assert_eq!(decimal_text("1e300"), None);
        assert_eq!(decimal_text("922337203685478.0"), None, "past the range");
    }

    #[test]
    fn nulls_are_left_out_and_everything_else_converts() {
        let args = serde_json::json!({"a": null, "b": 1, "c": 1.5, "d": [1, null, "x"], "e": {"f": true},
            "g": 18446744073709551615u64, "h": 0.1234567});
        let Value::Object(map) = &args else { panic!("object") };
        let expr = record(map);
        let text = format!("{expr:?}");
        assert!(!text.contains("\"a\""), "{text}");
        assert!(text.contains("1.5"), "{text}");
        assert!(text.contains("18446744073709551615"), "an integer past 64 bits is text: {text}");
        assert!(text.contains("0.1234567"), "{text}");
    }
}
