//! Unit tests for redaction, the canonical form, the chain and times. The writer and `verify`
//! against both databases are in `tests/it/audit.rs`.

use serde_json::json;

use super::redact::scrub;
use super::time::{format_ms, parse_ms};
use super::*;

#[test]
fn audit_redacts_sensitive_keys_at_any_depth() {
    let r = Redactor::default();
    let args = json!({
        "repo": "acme/widgets",
        "Password": "hunter2",
        "GITHUB_TOKEN": 12345,
        "X-Api-Key": "k",
        "apiKey": "k",
        "headers": { "Authorization": "Basic dXNlcjpwYXNz", "Cookie": ["a=b"] },
        "list": [{ "client_secret": "s", "name": "ok" }],
        "nested": { "private_key": { "pem": "-----BEGIN" } },
    });
    let out = r.redact(&args);
    assert_eq!(
        out,
        json!({
            "repo": "acme/widgets",
            "Password": REDACTED,
            "GITHUB_TOKEN": REDACTED,
            "X-Api-Key": REDACTED,
            "apiKey": REDACTED,
            "headers": { "Authorization": REDACTED, "Cookie": REDACTED },
            "list": [{ "client_secret": REDACTED, "name": "ok" }],
            "nested": { "private_key": REDACTED },
        })
    );
}

#[test]
fn audit_redact_keys_are_configurable() {
    let r = Redactor::new(&["SSN"]);
    assert_eq!(r.redact(&json!({"user_ssn": "1", "password": "p"})), json!({"user_ssn": REDACTED, "password": "p"}));
}

#[test]
fn audit_redacts_token_patterns_inside_strings() {
    let cases = [
        ("ghp_0123456789abcdefghijABCDEFGHIJ012345", "[REDACTED]"),
        ("use gho_0123456789abcdefghij0123 now", "use [REDACTED] now"),
        ("ghs_abcdefghijklmnopqrstu", "[REDACTED]"),
        ("github_pat_11ABCDEFG0123456789_abcdefghijklmnop", "[REDACTED]"),
        ("xoxb-123456789012-abcdefghij", "[REDACTED]"),
        ("xoxp-1234567890-xyz", "[REDACTED]"),
        ("key=AKIAIOSFODNN7EXAMPLE;", "key=[REDACTED];"),
        ("Authorization: Bearer abc.def-ghi_jkl==", "Authorization: [REDACTED]"),
        ("bearer   0123456789", "[REDACTED]"),
        (
            "t=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
            "t=[REDACTED]",
        ),
        ("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "[REDACTED]"),
        ("pcl_0123456789ABCDEFGHIJabcdefghij0123456789XYZabc", "[REDACTED]"),
        ("sk-proj-0123456789abcdefghijKLMN", "[REDACTED]"),
        ("two: sk-0123456789abcdefghij0 and ghp_0123456789abcdefghij0", "two: [REDACTED] and [REDACTED]"),
        ("ünïcode ghp_0123456789abcdefghij0 ✓", "ünïcode [REDACTED] ✓"),
    ];
    for (input, want) in cases {
        assert_eq!(scrub(input).as_deref(), Some(want), "{input}");
    }
}

#[test]
fn audit_leaves_ordinary_text_alone() {
    for s in [
        "hello world",
        "desk-0123456789abcdefghijklmnop",
        "ghp_short",
        "Bearer token",
        "a bearer of news",
        "eyJ alone",
        "AKIA123",
        "xoxz-1234567890",
        "pcl_short",
        "mask-0123456789abcdefghijklmno",
        "",
    ] {
        assert_eq!(scrub(s), None, "{s}");
    }
}

#[test]
fn audit_redaction_reaches_keys_and_arrays() {
    let r = Redactor::default();
    let out = r.redact(&json!({"ghp_0123456789abcdefghij0": 1, "notes": ["Bearer abcdefgh12345678", 7, null]}));
    assert_eq!(out, json!({"[REDACTED]": 1, "notes": ["[REDACTED]", 7, null]}));
}

#[test]
fn audit_arguments_debug_never_shows_values() {
    let args = Arguments::new(json!({"password": "hunter2", "q": "ghp_0123456789abcdefghij0"}));
    let mut record = Record::new(1, "req-1", "tools/call", Decision::Allow);
    record.arguments = args.clone();
    for text in [format!("{args:?}"), format!("{record:?}"), format!("{record:#?}")] {
        assert!(!text.contains("hunter2") && !text.contains("ghp_"), "{text}");
    }
    let entry = record.clone().into_entry(&Redactor::default());
    assert_eq!(entry.arguments, r#"{"password":"[REDACTED]","q":"[REDACTED]"}"#);
    assert!(!format!("{entry:?}").contains("hunter2"));
}

#[test]
fn audit_canonical_form_is_sorted_and_stable() {
    let mut record = Record::new(1_700_000_000_123, "r\"1", "tools/call", Decision::Deny);
    record.tool = Some("search".into());
    record.upstream_status = Some(-32601);
    record.latency_us = u64::MAX;
    record.arguments = Arguments::new(json!({"b": [1, {"z": 1, "a": 2}], "a": 1.5}));
    let mut entry = record.clone().into_entry(&Redactor::default());
    entry.seq = 7;
    let text = String::from_utf8(entry.canonical()).expect("utf-8");
    assert_eq!(
        text,
        concat!(
            r#"{"arguments":{"a":1.5,"b":[1,{"a":2,"z":1}]},"bytes_in":0,"bytes_out":0,"client_name":null,"#,
            r#""client_version":null,"decision":"deny","latency_us":9223372036854775807,"method":"tools/call","#,
            r#""principal_id":null,"principal_kind":null,"principal_name":null,"request_id":"r\"1","seq":7,"#,
            r#""server":null,"time_ms":1700000000123,"token_id":null,"tool":"search","upstream_status":-32601}"#
        )
    );
    let parsed: serde_json::Value = serde_json::from_str(&text).expect("canonical form is JSON");
    let keys: Vec<_> = parsed.as_object().expect("object").keys().cloned().collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
}

#[test]
fn audit_nul_characters_are_replaced_before_storing() {
    let mut record = Record::new(1, "a\0b", "m", Decision::Error);
    record.client_name = Some("x\0".into());
    let entry = record.clone().into_entry(&Redactor::default());
    assert_eq!(entry.request_id, "a\u{fffd}b");
    assert_eq!(entry.client_name.as_deref(), Some("x\u{fffd}"));
}

#[test]
fn audit_chain_links_and_detects_changes() {
    let r = Redactor::default();
    let mut first = Record::new(1, "a", "tools/list", Decision::Allow).into_entry(&r);
    seal(&mut first, 1, &GENESIS);
    let mut second = Record::new(2, "b", "tools/call", Decision::Allow).into_entry(&r);
    seal(&mut second, 2, &first.hash);
    assert_eq!(first.prev_hash, GENESIS.to_vec());
    assert_eq!(second.prev_hash, first.hash);
    assert_eq!(entry_hash(&second).to_vec(), second.hash);
    let mut edited = second.clone();
    edited.bytes_out = 1;
    assert_ne!(entry_hash(&edited).to_vec(), second.hash);
    let mut moved = second.clone();
    moved.seq = 3;
    assert_ne!(entry_hash(&moved).to_vec(), second.hash);
}

#[test]
fn audit_hex_is_lower_case() {
    assert_eq!(hex(&[0, 0xab, 0x0f, 0xff]), "00ab0fff");
}

#[test]
fn audit_times_parse_and_format() {
    assert_eq!(parse_ms("1795437949").expect("unix"), 1_795_437_949_000);
    assert_eq!(parse_ms("2026-11-23T12:45:49Z").expect("rfc3339"), 1_795_437_949_000);
    assert_eq!(parse_ms("2026-11-23T12:45:49.5Z").expect("fraction"), 1_795_437_949_500);
    assert_eq!(parse_ms("2026-11-23T12:45:49.123456Z").expect("micros"), 1_795_437_949_123);
    assert_eq!(parse_ms("2026-11-23T13:45:49+01:00").expect("offset"), 1_795_437_949_000);
    assert_eq!(parse_ms("2026-11-23T07:15:49-05:30").expect("negative offset"), 1_795_437_949_000);
    assert_eq!(parse_ms("2026-11-23").expect("date"), 1_795_392_000_000);
    assert_eq!(parse_ms("2000-02-29T00:00:00Z").expect("leap day"), 951_782_400_000);
    assert_eq!(parse_ms("1970-01-01T00:00:00Z").expect("epoch"), 0);
    for bad in [
        "",
        "yesterday",
        "2026-13-01",
        "2026-02-30",
        "2026-11-23T25:00:00Z",
        "2026-11-23T12:45:49",
        "2026-11-23T12:45Z",
    ] {
        assert!(parse_ms(bad).is_err(), "{bad}");
    }
    assert_eq!(format_ms(1_795_437_949_007), "2026-11-23T12:45:49.007Z");
    assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
}

#[test]
fn audit_config_defaults_and_strictness() {
    let c: AuditConfig = toml::from_str("").expect("empty is fine");
    assert_eq!(c, AuditConfig::default());
    assert_eq!(c.capacity, 10_000);
    assert_eq!(c.durability, Durability::Async);
    assert_eq!(c.redact_keys.len(), DEFAULT_REDACT_KEYS.len());
    let c: AuditConfig =
        toml::from_str("durability = \"strict\"\ncapacity = 5\nredact_keys = [\"pin\"]").expect("parses");
    assert_eq!((c.durability, c.capacity, c.redact_keys), (Durability::Strict, 5, vec!["pin".to_owned()]));
    assert!(toml::from_str::<AuditConfig>("durabilty = \"strict\"").is_err(), "unknown keys are refused");
    assert!(toml::from_str::<AuditConfig>("durability = \"sometimes\"").is_err());
    let zero = AuditConfig { capacity: 0, redact_keys: vec!["-".into()], ..AuditConfig::default() };
    assert_eq!(zero.problems().len(), 2);
}
