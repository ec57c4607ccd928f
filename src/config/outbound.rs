//! `[outbound]`: the settings of the guarded outbound HTTP client (`net`).

/// `[outbound]`: the guard on every URL that comes from an upstream or a client.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    /// Allow `http://` to loopback hosts, and loopback addresses at all. For development and
    /// tests against local authorization servers only; never in production. Default `false`.
    pub allow_http_loopback: bool,
    /// Networks (CIDR, e.g. `"10.20.0.0/16"`) allowed although not public, for on-premises
    /// authorization servers. Default none.
    pub allow_networks: Vec<String>,
    /// Longest time for one outbound request, e.g. `"10s"`. Default `"10s"`.
    pub timeout: String,
    /// Largest accepted response body in bytes. Default `262144` (256 KiB).
    pub max_body_bytes: usize,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            allow_http_loopback: false,
            allow_networks: Vec::new(),
            timeout: "10s".to_owned(),
            max_body_bytes: 256 * 1024,
        }
    }
}

impl OutboundConfig {
    /// Every problem with these settings, one line each, for the config validator.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for n in &self.allow_networks {
            if n.parse::<ipnet::IpNet>().is_err() {
                problems.push(format!("outbound.allow_networks: {n:?} is not a network like \"10.20.0.0/16\""));
            }
        }
        if super::parse_duration(&self.timeout).is_none_or(|d| d.is_zero()) {
            problems.push(format!("outbound.timeout: {:?} is not a duration like \"10s\"", self.timeout));
        }
        if self.max_body_bytes == 0 {
            problems.push("outbound.max_body_bytes must be at least 1".to_owned());
        }
        problems
    }
}
