//! Protocol revisions. The gateway negotiates with the client and with each upstream
//! separately, so any supported client revision works with any supported upstream revision.

/// Every revision the gateway speaks, oldest first.
pub const SUPPORTED: &[&str] = &["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25", STATELESS];
/// The newest revision with `initialize` and sessions.
pub const LATEST_STATEFUL: &str = "2025-11-25";
/// The stateless revision: `server/discover`, per-request `_meta`, no session.
pub const STATELESS: &str = "2026-07-28";

/// Whether clients of `version` may send JSON-RPC batches (2024-11-05 and 2025-03-26 only;
/// later revisions removed them).
pub fn has_batches(version: &str) -> bool {
    matches!(version, "2024-11-05" | "2025-03-26")
}

/// `version` as an HTTP header value, without copying the known ones.
pub fn header_value(version: &str) -> http::HeaderValue {
    match SUPPORTED.iter().find(|v| **v == version) {
        Some(v) => http::HeaderValue::from_static(v),
        None => http::HeaderValue::from_str(version).unwrap_or(http::HeaderValue::from_static(LATEST_STATEFUL)),
    }
}

/// Whether the gateway speaks `version`.
pub fn is_supported(version: &str) -> bool {
    SUPPORTED.contains(&version)
}

/// The revision to answer an `initialize` asking for `requested` with: the same when the
/// gateway speaks it, else the newest stateful one (the stateless revision has no `initialize`).
pub fn negotiate(requested: &str) -> &'static str {
    SUPPORTED.iter().find(|v| **v == requested && **v != STATELESS).copied().unwrap_or(LATEST_STATEFUL)
}

#[cfg(test)]
mod tests {
    #[test]
    fn negotiation_keeps_known_revisions_and_falls_back() {
        assert_eq!(super::negotiate("2025-03-26"), "2025-03-26");
        assert_eq!(super::negotiate("2099-01-01"), "2025-11-25");
        assert_eq!(super::negotiate("2026-07-28"), "2025-11-25");
    }
}
