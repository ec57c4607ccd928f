//! URL checks that decide before any connection is attempted. Fetches that do connect are
//! tested in `tests/it/egress.rs`, inside a network namespace that has only loopback.

use super::*;

fn url(s: &str) -> Url {
    Url::parse(s).expect("a URL")
}

fn dev() -> Policy {
    Policy { allow_http_loopback: true, ..Policy::default() }
}

#[test]
fn only_https_unless_loopback_http_is_allowed() {
    let strict = Policy::default();
    assert!(strict.check_url(&url("https://auth.example.com/.well-known/x")).is_ok());
    for bad in [
        "http://auth.example.com/",
        "javascript:alert(1)",
        "data:text/html,hi",
        "file:///etc/passwd",
        "ftp://a.example/",
    ] {
        let e = strict.check_url(&url(bad)).expect_err(bad);
        assert!(e.to_string().contains("only https"), "{bad}: {e}");
    }
    // Loopback http: only with the development switch, and only to loopback.
    assert!(strict.check_url(&url("http://127.0.0.1:8080/")).is_err());
    assert!(dev().check_url(&url("http://127.0.0.1:8080/")).is_ok());
    assert!(dev().check_url(&url("http://localhost:8080/")).is_ok());
    assert!(dev().check_url(&url("http://[::1]:8080/")).is_ok());
    assert!(dev().check_url(&url("http://auth.example.com/")).is_err());
    assert!(dev().check_url(&url("http://10.0.0.1/")).is_err());
}

#[test]
fn ip_literals_are_refused_before_connecting() {
    let strict = Policy::default();
    for (u, class) in [
        ("https://169.254.169.254/latest/meta-data/", Class::LinkLocal),
        ("https://10.0.0.1/", Class::Private),
        ("https://[::1]/", Class::Loopback),
        ("https://[::ffff:169.254.169.254]/", Class::LinkLocal),
        ("https://127.0.0.1/", Class::Loopback),
        ("https://0.0.0.0/", Class::Unspecified),
    ] {
        match strict.check_url(&url(u)) {
            Err(EgressError::Address { class: c, .. }) => assert_eq!(c, class, "{u}"),
            other => panic!("{u}: {other:?}"),
        }
    }
    // The allow list opens a network for on-premises authorization servers.
    let onprem = Policy { allow_networks: vec!["10.20.0.0/16".parse().expect("cidr")], ..Policy::default() };
    assert!(onprem.check_url(&url("https://10.20.1.2/")).is_ok());
    assert!(onprem.check_url(&url("https://10.21.1.2/")).is_err());
}

#[test]
fn errors_never_show_queries_or_credentials() {
    let strict = Policy::default();
    let e = strict.check_url(&url("http://user:hunter2@auth.example.com/x?code=secret-code")).expect_err("http");
    let text = e.to_string();
    assert!(!text.contains("hunter2") && !text.contains("secret-code"), "{text}");
    let e = strict.check_url(&url("https://user:hunter2@auth.example.com/")).expect_err("credentials");
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

#[test]
fn what_a_url_needs_agrees_with_the_guard() {
    let private = Policy { allow_networks: vec!["10.20.0.0/16".parse().expect("net")], ..Policy::default() };
    let literals = [
        "https://93.184.216.34/",
        "http://93.184.216.34/",
        "https://127.0.0.1/",
        "http://127.0.0.1:9000/",
        "http://[::1]/",
        "https://10.20.1.1/",
        "https://10.30.1.1/",
        "http://10.20.1.1/",
        "https://169.254.169.254/",
        "https://[fe80::1]/",
    ];
    for policy in [Policy::default(), dev(), private] {
        for u in literals {
            let needs = policy.needs(&url(u));
            assert_eq!(needs.is_none(), policy.check_url(&url(u)).is_ok(), "{u} {policy:?}: {needs:?}");
        }
    }
    let strict = Policy::default();
    assert_eq!(strict.needs(&url("http://localhost:8080/")), Some(Needed::AllowHttpLoopback));
    assert_eq!(strict.needs(&url("https://localhost/")), Some(Needed::AllowHttpLoopback));
    assert_eq!(dev().needs(&url("http://localhost:8080/")), None);
    assert_eq!(strict.needs(&url("http://auth.example.com/")), Some(Needed::Https));
    assert_eq!(dev().needs(&url("http://auth.example.com/")), Some(Needed::Https));
    assert_eq!(strict.needs(&url("https://auth.example.com/")), None);
    let link_local = "169.254.169.254".parse().expect("addr");
    assert_eq!(strict.needs(&url("https://169.254.169.254/")), Some(Needed::Network(link_local, Class::LinkLocal)));
}

#[tokio::test]
async fn a_client_that_cannot_be_built_refuses_every_fetch_and_connects_nowhere() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let target = url(&format!("http://{}/x", listener.local_addr().expect("addr")));
    // A TLS backend reqwest does not know makes `build` fail, as a broken one would.
    let broken = reqwest::Client::builder().tls_backend_preconfigured(42u8);
    let egress = Egress::from_builder(broken, Arc::new(dev()));
    let err = egress.get(&target, HeaderMap::new()).await.expect_err("refused");
    assert!(matches!(err, EgressError::Transport { .. }), "{err:?}");
    assert!(err.to_string().contains("guarded HTTP client could not be built"), "{err}");
    assert!(listener.accept().is_err(), "nothing connected: there is no unguarded fallback");
    // The same policy with a working client does connect (the listener above sees it).
    let working = Egress::new(dev());
    let _ = tokio::time::timeout(std::time::Duration::from_millis(300), working.get(&target, HeaderMap::new())).await;
    assert!(listener.accept().is_ok(), "the guarded client reaches loopback under the dev policy");
}
