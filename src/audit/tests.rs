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
fn audit_redacts_the_common_secret_key_names() {
    let r = Redactor::default();
    let args = json!({
        "passwd": "a", "db_pwd": "b", "Passphrase": "c", "credentials": {"user": "u", "pass": "p"},
        "AWS_SECRET_ACCESS_KEY": "d", "id_token": "e", "x-api-key": "f", "ApiKey": "g",
        "privateKey": "h", "Authorization": "i", "set-cookie": "j", "sessionId": "k",
        "query": "kept", "path": "/tmp/x",
    });
    let out = r.redact(&args);
    for key in [
        "passwd",
        "db_pwd",
        "Passphrase",
        "credentials",
        "AWS_SECRET_ACCESS_KEY",
        "id_token",
        "x-api-key",
        "ApiKey",
        "privateKey",
        "Authorization",
        "set-cookie",
        "sessionId",
    ] {
        assert_eq!(out[key], REDACTED, "{key}");
    }
    assert_eq!((&out["query"], &out["path"]), (&json!("kept"), &json!("/tmp/x")));
}

#[test]
fn audit_redacts_passwords_in_urls() {
    let cases = [
        ("https://user:pass@host/x", "https://user:[REDACTED]@host/x"),
        (
            "clone https://alice:s3cr%40t@git.example.com/r.git now",
            "clone https://alice:[REDACTED]@git.example.com/r.git now",
        ),
        (
            "postgres://app:hunter2@db:5432/main?sslmode=require",
            "postgres://app:[REDACTED]@db:5432/main?sslmode=require",
        ),
        ("redis://:onlypass@cache", "redis://:[REDACTED]@cache"),
        ("ftp://u:p@ss:w@rd@host", "ftp://u:[REDACTED]@host"),
        ("two http://a:1@h and http://b:2@k", "two http://a:[REDACTED]@h and http://b:[REDACTED]@k"),
        ("ünï https://ü:✓pass@h ✓", "ünï https://ü:[REDACTED]@h ✓"),
    ];
    for (input, want) in cases {
        assert_eq!(scrub(input).as_deref(), Some(want), "{input}");
    }
    for kept in [
        "https://user@host/x",
        "https://user:@host",
        "https://host:8443/a@b",
        "mailto:someone@example.com",
        "see https://example.com/?q=a:b@c",
        "://",
        "x://:",
        "a://b:c",
    ] {
        assert_eq!(scrub(kept), None, "{kept}");
    }
}

#[test]
fn audit_redacts_pem_private_keys() {
    let key =
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy\n-----END RSA PRIVATE KEY-----";
    assert_eq!(scrub(&format!("key:\n{key}\nrest")).as_deref(), Some("key:\n[REDACTED]\nrest"));
    for label in
        ["PRIVATE KEY", "EC PRIVATE KEY", "ENCRYPTED PRIVATE KEY", "OPENSSH PRIVATE KEY", "PGP PRIVATE KEY BLOCK"]
    {
        let pem = format!("-----BEGIN {label}-----\nAAAAB3NzaC1yc2E\n-----END {label}-----\n");
        assert_eq!(scrub(&pem).as_deref(), Some("[REDACTED]\n"), "{label}");
    }
    // Cut short: everything from the header on goes.
    assert_eq!(scrub("x -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg").as_deref(), Some("x [REDACTED]"));
    // Certificates and public keys are public.
    for kept in [
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
        "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----",
        "-----BEGIN",
        "----- BEGIN PRIVATE KEY -----",
    ] {
        assert_eq!(scrub(kept), None, "{kept}");
    }
    let r = Redactor::default();
    assert_eq!(r.redact(&json!({"files": [{"content": key}]})), json!({"files": [{"content": REDACTED}]}));
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
    assert_eq!(c.capacity, 1_024);
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

#[test]
fn audit_checkpoint_settings_default_on_and_are_checked() {
    use std::path::Path;
    use std::time::Duration;
    let c = AuditConfig::default();
    assert_eq!(c.checkpoint_every(), Some(Duration::from_secs(60)));
    assert_eq!(c.checkpoint_path(Path::new("/data")), Path::new("/data/audit-checkpoints.jsonl"));
    let c: AuditConfig =
        toml::from_str("checkpoint_interval = \"250ms\"\ncheckpoint_file = \"/elsewhere/cp\"").expect("parses");
    assert_eq!(c.checkpoint_every(), Some(Duration::from_millis(250)));
    assert_eq!(c.checkpoint_path(Path::new("/data")), Path::new("/elsewhere/cp"));
    assert!(c.problems().is_empty());
    let off: AuditConfig = toml::from_str("checkpoint_interval = \"0s\"").expect("parses");
    assert_eq!((off.checkpoint_every(), off.problems().len()), (None, 0));
    let bad: AuditConfig = toml::from_str("checkpoint_interval = \"often\"\ncheckpoint_file = \"\"").expect("parses");
    let problems = bad.problems();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("checkpoint_interval"), "{problems:?}");
}

#[test]
fn audit_text_fields_are_capped_at_a_character_boundary() {
    let long = format!("a{}", "☃".repeat(10_000));
    let mut record = Record::new(1, long.clone(), long.clone(), Decision::Deny);
    record.server = Some(long.clone());
    record.tool = Some(long.clone());
    record.client_name = Some(long.clone());
    record.client_version = Some(long.clone());
    record.principal_name = Some(long.clone());
    let e = record.into_entry(&Redactor::default());
    for field in [&e.request_id, &e.method] {
        assert!(field.len() <= record::MAX_TEXT_BYTES && field.ends_with(record::CUT_MARK), "{}", field.len());
    }
    for field in [&e.server, &e.tool, &e.client_name, &e.client_version, &e.principal_name] {
        let field = field.as_deref().expect("kept");
        assert!(field.len() <= record::MAX_TEXT_BYTES && field.starts_with("a☃☃"), "{}", field.len());
    }
    let short = Record::new(1, "r", "tools/call", Decision::Allow).into_entry(&Redactor::default());
    assert_eq!((short.request_id.as_str(), short.method.as_str()), ("r", "tools/call"));
}

#[test]
fn audit_large_arguments_become_a_summary_that_fits() {
    let big = json!({"q": "x".repeat(200_000), "text": "é\"\\".repeat(30_000)});
    for (principal, budget) in
        [(Some("p".to_owned()), record::MAX_ARGUMENTS_BYTES), (None, record::MAX_ANONYMOUS_ARGUMENTS_BYTES)]
    {
        let mut r = Record::new(1, "r", "tools/call", Decision::Allow);
        r.principal_id = principal;
        r.arguments = Arguments::new(big.clone());
        let e = r.into_entry(&Redactor::default());
        assert!(e.arguments.len() <= budget, "{} > {budget}", e.arguments.len());
        let v: serde_json::Value = serde_json::from_str(&e.arguments).expect("still JSON");
        let t = &v["$truncated"];
        assert!(t["bytes"].as_u64().is_some_and(|n| n > 200_000), "{t}");
        assert_eq!(t["sha256"].as_str().map(str::len), Some(64));
        assert!(t["head"].as_str().is_some_and(|h| h.starts_with("{\"q\":\"xxx") && h.len() > budget / 2), "{t}");
    }
    // Escapes in the head cannot push the summary past the budget.
    for budget in [64, 200, 333, 1024] {
        let out = record::cap_arguments(format!("\"{}\"", "\\\"\u{1}".repeat(500)), budget);
        assert!(out.len() <= budget.max(120), "{budget}: {}", out.len());
        serde_json::from_str::<serde_json::Value>(&out).expect("JSON");
    }
    assert_eq!(record::cap_arguments("{\"a\":1}".into(), 7), "{\"a\":1}");
}
