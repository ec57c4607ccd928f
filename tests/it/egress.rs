//! The guarded outbound client (`portcullis::net::Egress`, R101/R121): refusals of private,
//! link-local and loopback addresses, redirects, oversized bodies and slow answers.
//!
//! Every test here runs inside a fresh network namespace with only loopback (`unshare -rn`, see
//! `common::outside_netns`): even if the guard were broken, no packet could leave the machine.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::IntoResponse;
use axum::routing::get;
use http::{HeaderMap, StatusCode, header};
use portcullis::net::{Class, Egress, EgressError, Policy};
use url::Url;

use crate::common::*;

fn dev(timeout: Duration) -> Egress {
    Egress::new(Policy { allow_http_loopback: true, timeout, max_body_bytes: 64 * 1024, ..Policy::default() })
}

/// A loopback server with the routes these tests need.
async fn hostile_server() -> String {
    let big = vec![b'x'; 200 * 1024];
    let app = Router::new()
        .route("/ok", get(|| async { axum::Json(serde_json::json!({"issuer": "https://as.example.com"})) }))
        .route(
            "/redirect",
            get(|| async {
                (StatusCode::FOUND, [(header::LOCATION, "http://169.254.169.254/latest/meta-data/?token=x")])
            }),
        )
        .route("/big", get(move || async move { big.clone() }))
        .route(
            "/big-chunked",
            get(|| async {
                let chunks = futures::stream::iter((0..100).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 4096])));
                Body::from_stream(chunks).into_response()
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn url(s: &str) -> Url {
    Url::parse(s).expect("a URL")
}

#[tokio::test(flavor = "multi_thread")]
async fn private_link_local_and_loopback_addresses_are_refused() {
    if outside_netns("egress::private_link_local_and_loopback_addresses_are_refused").await {
        return;
    }
    let strict = Egress::new(Policy { timeout: Duration::from_secs(2), ..Policy::default() });
    for (u, class) in [
        ("https://169.254.169.254/latest/meta-data/", Class::LinkLocal),
        ("https://10.0.0.1/.well-known/oauth-authorization-server", Class::Private),
        ("https://[::1]/.well-known/oauth-protected-resource", Class::Loopback),
        ("https://[fd00::1]/", Class::Private),
        // A name is judged by what it resolves to, at connect time (the address is pinned).
        ("https://localhost/.well-known/openid-configuration", Class::Loopback),
    ] {
        match strict.get(&url(u), HeaderMap::new()).await {
            Err(EgressError::Address { class: c, .. }) => assert_eq!(c, class, "{u}"),
            other => panic!("{u}: expected a refusal, got {other:?}"),
        }
    }
    // Plain http is refused without the development switch, even to loopback.
    let e = strict.get(&url("http://127.0.0.1:9/"), HeaderMap::new()).await.expect_err("http");
    assert!(e.to_string().contains("only https"), "{e}");
    // With it, loopback works and nothing else does.
    let server = hostile_server().await;
    let ok = dev(Duration::from_secs(2)).get(&url(&format!("{server}/ok")), HeaderMap::new()).await.expect("fetched");
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json::<serde_json::Value>().expect("json")["issuer"], "https://as.example.com");
    let e = dev(Duration::from_secs(2)).get(&url("https://10.0.0.1/"), HeaderMap::new()).await.expect_err("private");
    assert!(matches!(e, EgressError::Address { class: Class::Private, .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn redirects_oversized_bodies_and_slow_answers_are_refused() {
    if outside_netns("egress::redirects_oversized_bodies_and_slow_answers_are_refused").await {
        return;
    }
    let server = hostile_server().await;
    let egress = dev(Duration::from_millis(800));
    match egress.get(&url(&format!("{server}/redirect")), HeaderMap::new()).await {
        Err(e @ EgressError::Redirect { .. }) => {
            let text = e.to_string();
            assert!(text.contains("169.254.169.254") && text.contains("not followed"), "{text}");
            assert!(!text.contains("token=x"), "no query in errors: {text}");
        }
        other => panic!("expected a refused redirect, got {other:?}"),
    }
    for path in ["/big", "/big-chunked"] {
        match egress.get(&url(&format!("{server}{path}")), HeaderMap::new()).await {
            Err(EgressError::TooLarge { limit, .. }) => assert_eq!(limit, 64 * 1024),
            other => panic!("{path}: expected a size refusal, got {other:?}"),
        }
    }
    let started = std::time::Instant::now();
    match egress.get(&url(&format!("{server}/slow")), HeaderMap::new()).await {
        Err(EgressError::Timeout { .. }) => assert!(started.elapsed() < Duration::from_secs(5)),
        other => panic!("expected a timeout, got {other:?}"),
    }
}

/// The vault's discovery refuses hostile metadata (R101, R102): an authorization server at a
/// link-local address, a challenge pointing at a private address, loopback without the
/// development switch, a redirect, an oversized document, and a `javascript:` authorization
/// endpoint, each with an error that says which.
#[tokio::test(flavor = "multi_thread")]
async fn vault_discovery_refuses_hostile_metadata() {
    if outside_netns("egress::vault_discovery_refuses_hostile_metadata").await {
        return;
    }
    use portcullis::oauth::client::challenge::BearerChallenge;
    use portcullis::oauth::client::discovery::{Pins, discover};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let b = base.clone();
    let app = Router::new()
        .route(
            "/.well-known/oauth-protected-resource/imds/mcp",
            get(move || async move {
                axum::Json(serde_json::json!({"resource": format!("{b}/imds/mcp"),
                    "authorization_servers": ["http://169.254.169.254"]}))
            }),
        )
        .route(
            "/.well-known/oauth-protected-resource/js/mcp",
            get({
                let b = base.clone();
                move || async move {
                    axum::Json(serde_json::json!({"resource": format!("{b}/js/mcp"), "authorization_servers": [b]}))
                }
            }),
        )
        .route(
            "/.well-known/oauth-protected-resource/redirect/mcp",
            get(|| async { (StatusCode::FOUND, [(header::LOCATION, "http://169.254.169.254/latest/meta-data/")]) }),
        )
        .route("/.well-known/oauth-protected-resource/big/mcp", get(|| async { vec![b' '; 300 * 1024] }))
        .route(
            "/.well-known/oauth-authorization-server",
            get({
                let b = base.clone();
                move || async move {
                    axum::Json(serde_json::json!({"issuer": b, "authorization_endpoint": "javascript:alert(1)",
                        "token_endpoint": format!("{b}/token"), "code_challenge_methods_supported": ["S256"]}))
                }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let egress = dev(Duration::from_secs(5));
    let url = |p: &str| Url::parse(&format!("{base}{p}")).expect("url");
    let err = |r: Result<_, portcullis::oauth::client::OAuthError>| r.map(|_| ()).expect_err("refused").to_string();

    let imds = err(discover(&egress, Some(&url("/imds/mcp")), None, &Pins::default()).await);
    assert!(imds.contains("169.254.169.254"), "{imds}");
    let private = BearerChallenge { resource_metadata: Some("https://10.0.0.1/prm".into()), ..Default::default() };
    let private = err(discover(&egress, Some(&url("/imds/mcp")), Some(&private), &Pins::default()).await);
    assert!(private.contains("10.0.0.1") && private.contains("not allowed"), "{private}");
    let strict = Egress::new(Policy::default());
    let loopback = err(discover(&strict, Some(&url("/js/mcp")), None, &Pins::default()).await);
    assert!(loopback.contains("refused"), "{loopback}");
    let js = err(discover(&egress, Some(&url("/js/mcp")), None, &Pins::default()).await);
    assert!(js.contains("authorization_endpoint") && js.contains("refused"), "{js}");
    let link_local =
        BearerChallenge { resource_metadata: Some("https://169.254.169.254/prm".into()), ..Default::default() };
    let link_local = err(discover(&egress, Some(&url("/imds/mcp")), Some(&link_local), &Pins::default()).await);
    assert!(link_local.contains("169.254.169.254") && link_local.contains("link-local"), "{link_local}");
    let v6 = BearerChallenge { resource_metadata: Some("https://[::1]:9/prm".into()), ..Default::default() };
    let v6 = err(discover(&strict, Some(&url("/imds/mcp")), Some(&v6), &Pins::default()).await);
    assert!(v6.contains("::1") && v6.contains("loopback"), "{v6}");
    let redirect = err(discover(&egress, Some(&url("/redirect/mcp")), None, &Pins::default()).await);
    assert!(redirect.contains("redirects are not followed") && redirect.contains("169.254.169.254"), "{redirect}");
    let big = err(discover(&egress, Some(&url("/big/mcp")), None, &Pins::default()).await);
    assert!(big.contains("more than 65536 bytes"), "{big}");
}
