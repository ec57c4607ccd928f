use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "test.toml", Vec::new())
}

#[test]
fn defaults_fill_an_empty_file() {
    let c = parse("").expect("empty config is valid");
    assert_eq!(c.gateway.listen.to_string(), "127.0.0.1:8080");
    assert!(c.gateway.public_url.is_none());
    assert_eq!(c.store.url, "sqlite://portcullis-data/portcullis.db");
    assert_eq!(c.gateway.request_timeout, Duration::from_secs(300));
}

#[test]
fn every_problem_is_reported_at_once_with_its_line() {
    let text = r#"
[gateway]
listen = "nowhere"
colour = "blue"

[[servers]]
name = "a"
url = "ftp://x"

[[servers]]
name = "Bad Name"
command = "x"

[[servers]]
name = "c"
urll = "http://x"
"#;
    let err = parse(text).expect_err("invalid");
    let all = err.to_string();
    assert!(all.contains("test.toml:2: [gateway]: unknown field `colour`"), "{all}");
    assert!(all.contains("test.toml:6: server \"a\": url \"ftp://x\""), "{all}");
    assert!(all.contains("test.toml:10: server \"Bad Name\": `name` must be"), "{all}");
    assert!(all.contains("test.toml:14: [[servers]] #3: unknown field `urll`"), "{all}");
    assert_eq!(err.problems.len(), 4, "{all}");
}

#[test]
fn environment_overrides_the_file() {
    let text = "[[servers]]\nname = \"my-files\"\ncommand = \"cat\"\n";
    let vars = vec![
        ("PORTCULLIS_GATEWAY__LISTEN".to_owned(), "127.0.0.1:9999".to_owned()),
        ("PORTCULLIS_SERVERS__MY_FILES__PUBLIC".to_owned(), "true".to_owned()),
        ("PORTCULLIS_CONFIG".to_owned(), "ignored.toml".to_owned()),
    ];
    let c = Config::parse(text, "t", vars).expect("valid");
    assert_eq!(c.gateway.listen.port(), 9999);
    assert!(c.servers[0].public);
}

#[test]
fn public_servers_need_a_loopback_listener_unless_forced() {
    let text = "[gateway]\nlisten = \"0.0.0.0:8080\"\n[[servers]]\nname = \"a\"\ncommand = \"x\"\npublic = true\n";
    let err = parse(text).expect_err("public on 0.0.0.0");
    assert!(err.to_string().contains("loopback"), "{err}");
    let forced = text.replace("[gateway]\n", "[gateway]\nforce_public_on_non_loopback = true\n");
    parse(&forced).expect("forced");
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
    assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
    assert_eq!(parse_duration("7 days"), None);
}

#[test]
fn stdio_start_timeout_is_apart_from_the_request_timeout() {
    let text = r#"
[gateway]
request_timeout = "5s"

[[servers]]
name = "cold"
command = "npx"
start_timeout = "10m"

[[servers]]
name = "plain"
command = "server"
"#;
    let c = parse(text).expect("valid");
    let start = |i: usize| match &c.servers[i].transport {
        ServerTransport::Stdio { start_timeout, .. } => *start_timeout,
        other => panic!("not stdio: {other:?}"),
    };
    assert_eq!(start(0), Duration::from_secs(600));
    assert_eq!(start(1), Duration::from_secs(DEFAULT_START_TIMEOUT_SECS), "not the 5 s request timeout");
    assert_eq!(c.servers[1].request_timeout, Duration::from_secs(5));
    let err = parse("[[servers]]\nname = \"h\"\nurl = \"https://x.example.com/mcp\"\nstart_timeout = \"1s\"\n")
        .expect_err("stdio only");
    assert!(err.to_string().contains("`start_timeout` apply only to `command`"), "{err}");
    let err = parse("[[servers]]\nname = \"s\"\ncommand = \"x\"\nstart_timeout = \"soon\"\n").expect_err("bad");
    assert!(err.to_string().contains("server \"s\": start_timeout: \"soon\" is not a duration"), "{err}");
}

#[test]
fn static_upstream_credentials_are_validated() {
    let text = r#"
[[servers]]
name = "gh"
url = "https://api.example.com/mcp"
auth = { type = "static", secret = "github-pat" }

[[servers]]
name = "custom"
url = "https://x.example.com/mcp"
auth = { type = "static", secret = "k", header = "X-Api-Key" }

[[servers]]
name = "local"
command = "server"
auth = { type = "static", secret = "github-pat", env = "GITHUB_TOKEN" }
"#;
    let c = parse(text).expect("valid");
    assert_eq!(
        c.servers[0].auth,
        UpstreamAuth::StaticHeader {
            secret: "github-pat".into(),
            header: "Authorization".into(),
            prefix: "Bearer ".into()
        }
    );
    assert_eq!(
        c.servers[1].auth,
        UpstreamAuth::StaticHeader { secret: "k".into(), header: "X-Api-Key".into(), prefix: String::new() }
    );
    assert_eq!(c.servers[2].auth, UpstreamAuth::StaticEnv { secret: "github-pat".into(), env: "GITHUB_TOKEN".into() });
    let bad = r#"
[[servers]]
name = "a"
command = "x"
auth = { type = "static", secret = "s" }

[[servers]]
name = "b"
url = "https://x.example.com"
auth = { type = "oauth2" }

[[servers]]
name = "c"
url = "https://x.example.com"
auth = { type = "static" }
"#;
    let err = parse(bad).expect_err("invalid").to_string();
    assert!(err.contains("server \"a\": auth: a stdio upstream takes its secret in `env"), "{err}");
    assert!(err.contains("server \"b\": auth: type \"oauth2\" is not supported"), "{err}");
    assert!(err.contains("server \"c\": auth: `static` needs `secret`"), "{err}");
}

#[test]
fn oauth_auth_is_parsed_with_its_pins_and_provider_quirks() {
    let text = r#"
[[servers]]
name = "gh"
url = "https://mcp.example.com/mcp"
auth = { type = "oauth", scopes = ["repo"], client_id = "abc", client_secret = "gh-client", issuer = "https://as.example.com", provider = "entra" }

[[servers]]
name = "shared"
url = "https://mcp.example.com/mcp"
auth = { type = "oauth", per_user = false, metadata_url = "https://as.example.com/.well-known/oauth-authorization-server" }
"#;
    let config = Config::parse(text, "t.toml", Vec::new()).expect("valid");
    let UpstreamAuth::OAuth(gh) = &config.servers[0].auth else { panic!("oauth") };
    assert!(gh.per_user && !gh.resource_parameter && gh.scope_on_refresh);
    assert_eq!(gh.scopes, ["repo"]);
    assert_eq!(gh.client_secret.as_deref(), Some("gh-client"));
    let UpstreamAuth::OAuth(shared) = &config.servers[1].auth else { panic!("oauth") };
    assert!(!shared.per_user && shared.resource_parameter && shared.metadata_url.is_some());
}

#[test]
fn oauth_misconfigurations_are_all_reported() {
    let text = r#"
[[servers]]
name = "a"
url = "https://x.example.com/mcp"
auth = { type = "oauth", secret = "s", client_secret = "c", provider = "nope", token_endpoint_auth_method = "magic" }

[[servers]]
name = "b"
url = "https://x.example.com/sse"
transport = "sse"
auth = { type = "oauth" }

[[servers]]
name = "c"
url = "https://x.example.com/mcp"
auth = { type = "client_credentials" }
"#;
    let err = Config::parse(text, "t.toml", Vec::new()).expect_err("invalid").to_string();
    for needle in [
        "`secret`, `header` and `prefix` belong to `static`",
        "`client_secret` needs `client_id`",
        "provider \"nope\"",
        "token_endpoint_auth_method \"magic\"",
        "OAuth upstreams need the Streamable HTTP transport",
        "`client_credentials` needs `client_id`",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from:\n{err}");
    }
}

#[test]
fn limits_have_production_defaults_and_are_validated() {
    let c = parse("").expect("valid");
    assert_eq!(c.limits.max_connections, 10_000);
    assert_eq!(c.limits.header_read_timeout, Duration::from_secs(10));
    assert_eq!(c.limits.idle_timeout, Duration::from_secs(60));
    assert_eq!((c.limits.failed_auth_burst, c.limits.failed_auth_per_minute), (20, 60));
    assert!(c.gateway.admin_listen.is_none() && c.gateway.trusted_proxies.is_empty() && !c.gateway.trust_request_id);
    let text = r#"
[gateway]
admin_listen = "127.0.0.1:9090"
trusted_proxies = ["10.0.0.0/8", "192.0.2.7"]

[limits]
max_in_flight = 8
failed_auth_per_minute = 0
"#;
    let c = parse(text).expect("valid");
    assert_eq!(c.gateway.admin_listen.map(|a| a.port()), Some(9090));
    assert_eq!(c.gateway.trusted_proxies.len(), 2);
    assert_eq!((c.limits.max_in_flight, c.limits.failed_auth_per_minute), (8, 0));
    let bad = "[gateway]\nadmin_listen = \"x\"\ntrusted_proxies = [\"proxy\"]\n\n[limits]\nmax_connections = 0\nidle_timeout = \"soon\"\nbogus = 1\n";
    let all = parse(bad).expect_err("invalid").to_string();
    assert!(all.contains("gateway.admin_listen"), "{all}");
    assert!(all.contains("gateway.trusted_proxies"), "{all}");
    assert!(all.contains("unknown field `bogus`"), "{all}");
    let bad = "[limits]\nmax_connections = 0\nidle_timeout = \"soon\"\n";
    let all = parse(bad).expect_err("invalid").to_string();
    assert!(all.contains("limits.max_connections must be at least 1"), "{all}");
    assert!(all.contains("limits.idle_timeout"), "{all}");
}

#[test]
fn memory_limits_have_defaults_servers_may_override_them_and_nonsense_is_refused() {
    let c = parse("[[servers]]\nname = \"a\"\nurl = \"http://x/mcp\"\n").expect("valid");
    assert_eq!(c.limits.upstream, UpstreamLimits::default());
    assert_eq!(c.limits.upstream.max_response_bytes, 16 * 1024 * 1024);
    assert_eq!(c.limits.client_queue_bytes, 4 * 1024 * 1024);
    assert_eq!(c.audit.max_overflow_bytes, 64 * 1024 * 1024);
    assert_eq!(c.servers[0].limits, c.limits.upstream);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);

    let text = r#"
[limits]
max_response_bytes = 1048576
upstream_queue = 8
sse_idle_timeout = "2m"
client_queue_bytes = 2048

[[servers]]
name = "a"
url = "http://x/sse"
transport = "sse"
max_response_bytes = 4096
idle_timeout = "30s"

[[servers]]
name = "b"
command = "x"
"#;
    let c = parse(text).expect("valid");
    let (a, b) = (&c.servers[0].limits, &c.servers[1].limits);
    assert_eq!((a.max_response_bytes, a.queue_messages, a.idle_timeout), (4096, 8, Duration::from_secs(30)));
    assert_eq!((b.max_response_bytes, b.queue_messages, b.idle_timeout), (1_048_576, 8, Duration::from_secs(120)));
    assert_eq!(c.limits.client_queue_bytes, 2048);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);

    let text = r#"
[limits]
max_response_bytes = 10
upstream_queue = 0
client_queue_bytes = 1

[audit]
max_overflow_bytes = 0

[[servers]]
name = "a"
url = "http://x/mcp"
idle_timeout = "1s"
"#;
    let all = parse(text).expect_err("invalid").to_string();
    for problem in [
        "limits.max_response_bytes: must be at least 1024",
        "limits.upstream_queue: must be at least 1",
        "limits.client_queue_bytes: must be at least 1024",
        "audit.max_overflow_bytes must be at least 1024",
        "`idle_timeout` applies only to `transport = \"sse\"`",
    ] {
        assert!(all.contains(problem), "{problem} in {all}");
    }
}

/// The memory limits' first spelling, under `[gateway]`, still works, with a warning naming
/// the line and the key to write instead; both spellings at once is an error, and a bad value
/// under the old key is reported under the key as written.
#[test]
fn memory_limits_under_gateway_still_work_with_a_deprecation_warning() {
    let text = r#"
[gateway]
max_response_bytes = 1048576
upstream_queue = 8
client_queue_bytes = 2048
sse_idle_timeout = "2m"

[[servers]]
name = "a"
url = "http://x/sse"
transport = "sse"
"#;
    let c = parse(text).expect("valid");
    let a = &c.servers[0].limits;
    assert_eq!((a.max_response_bytes, a.queue_messages, a.idle_timeout), (1_048_576, 8, Duration::from_secs(120)));
    assert_eq!(c.limits.upstream, *a);
    assert_eq!(c.limits.client_queue_bytes, 2048);
    assert_eq!(c.warnings.len(), 4, "{:?}", c.warnings);
    assert_eq!(
        c.warnings[0],
        "gateway.max_response_bytes (line 2): is deprecated: write it as limits.max_response_bytes (under [limits])"
    );
    for key in ["upstream_queue", "client_queue_bytes", "sse_idle_timeout"] {
        assert!(c.warnings.iter().any(|w| w.starts_with(&format!("gateway.{key} (line "))), "{key}");
    }

    let both = "[gateway]\nmax_response_bytes = 4096\n\n[limits]\nmax_response_bytes = 8192\n";
    let all = parse(both).expect_err("both").to_string();
    assert!(all.contains("gateway.max_response_bytes: is also set as limits.max_response_bytes"), "{all}");
    let bad = parse("[gateway]\nupstream_queue = 0\n").expect_err("invalid").to_string();
    assert!(bad.contains("gateway.upstream_queue: must be at least 1"), "{bad}");
}
