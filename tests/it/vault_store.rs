//! The vault's rows on SQLite and on PostgreSQL: single-use flows and links, the connection's
//! generation guard (a refresh that lost a race cannot overwrite), and the refresh lock that
//! serialises replicas sharing PostgreSQL.

use std::time::Duration;

use portcullis::crypto::Sealed;
use portcullis::keys::KeyId;
use portcullis::store::Store;
use portcullis::store::vault::{ClientRow, ConnectionRow, FlowRow, LinkRow, refresh_lock};

use crate::common::FreshPostgres;

const NOW: i64 = 1_760_000_000;

async fn sqlite() -> (Store, Option<FreshPostgres>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::connect(&format!("sqlite://{}/v.db", dir.path().display())).await.expect("sqlite opens");
    (store, None, dir)
}

async fn postgres() -> (Store, Option<FreshPostgres>, tempfile::TempDir) {
    let pg = FreshPostgres::create().await;
    let store = Store::connect(&pg.url).await.expect("PostgreSQL on 127.0.0.1:5432 must be running");
    (store, Some(pg), tempfile::tempdir().expect("tempdir"))
}

fn sealed(byte: u8) -> Sealed {
    Sealed { key_id: KeyId::parse("k1").expect("key id"), ciphertext: vec![byte; 40] }
}

fn connection(id: &str, subject: &str) -> ConnectionRow {
    ConnectionRow {
        id: id.into(),
        server: "gh".into(),
        subject: subject.into(),
        issuer: "https://as.example.com".into(),
        client_id: "c1".into(),
        scopes: "repo".into(),
        details: "{}".into(),
        sealed: sealed(1),
        expires_at: Some(NOW + 60),
        status: "active".into(),
        generation: 0,
        created_at: NOW,
        refreshed_at: None,
        last_error: None,
    }
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (store, _pg, _dir) = super::sqlite().await;
                super::$name(store).await
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (store, _pg, _dir) = super::postgres().await;
                super::$name(store).await
            })*
        }
    };
}

on_both!(
    flows_and_links_work_once,
    connections_keep_one_writer_per_generation,
    registrations_are_per_issuer,
    refresh_leases_have_one_holder,
    session_upstreams_keep_one_writer_per_generation,
    catalog_pages_are_replaced,
);

/// One process at a time holds a connection's refresh lease; it runs out, and only its holder
/// gives it back.
async fn refresh_leases_have_one_holder(store: Store) {
    store.vault_connection_put(&connection("c1", "u1")).await.expect("put");
    let take = |owner: &'static str, now: i64| {
        let store = store.clone();
        async move { store.vault_refresh_lease_take("gh", "u1", owner, now, now + 30).await.expect("take") }
    };
    assert_eq!(take("a", NOW).await, Some(true));
    assert_eq!(take("b", NOW + 1).await, Some(false), "held by a");
    store.vault_refresh_lease_release("gh", "u1", "b").await.expect("release");
    assert_eq!(take("b", NOW + 2).await, Some(false), "only its holder gives it back");
    assert_eq!(take("b", NOW + 30).await, Some(true), "a's lease ran out");
    store.vault_refresh_lease_release("gh", "u1", "b").await.expect("release");
    assert_eq!(take("a", NOW + 31).await, Some(true), "given back");
    assert_eq!(
        store.vault_refresh_lease_take("gh", "nobody", "a", NOW, NOW + 30).await.expect("take"),
        None,
        "no connection, nothing to lock"
    );
}

/// The upstream side of a re-opened session: one writer per generation, so two replicas
/// re-opening at once agree on one.
async fn session_upstreams_keep_one_writer_per_generation(store: Store) {
    use portcullis::store::sessions::SessionUpstreamRow;
    let row = |generation: i64, byte: u8| SessionUpstreamRow {
        session_key: "k1".into(),
        server: "gh".into(),
        sealed: sealed(byte),
        generation,
        updated_at: NOW,
    };
    assert!(store.session_upstream_put(&row(1, 1), None).await.expect("put"), "the first side");
    assert!(!store.session_upstream_put(&row(1, 2), None).await.expect("put"), "a second first side loses");
    assert!(store.session_upstream_put(&row(2, 3), Some(1)).await.expect("put"), "re-opened");
    assert!(!store.session_upstream_put(&row(2, 4), Some(1)).await.expect("put"), "a stale re-open loses");
    let stored = store.session_upstream("k1").await.expect("get").expect("there");
    assert_eq!((stored.generation, stored.sealed.ciphertext[0]), (2, 3));
    // Rows untouched for longer than their time to live go with the next write.
    let later = SessionUpstreamRow {
        session_key: "k2".into(),
        updated_at: NOW + portcullis::store::sessions::SESSION_UPSTREAM_TTL_SECS + 1,
        ..row(1, 5)
    };
    assert!(store.session_upstream_put(&later, None).await.expect("put"));
    assert!(store.session_upstream("k1").await.expect("get").is_none(), "expired");
    store.session_upstream_delete("k2").await.expect("delete");
    assert!(store.session_upstream("k2").await.expect("get").is_none());
}

/// A catalog page is replaced, not duplicated.
async fn catalog_pages_are_replaced(store: Store) {
    store.catalog_put("gh", "tools/list", "", r#"{"tools":[]}"#, NOW).await.expect("put");
    store.catalog_put("gh", "tools/list", "", r#"{"tools":[{"name":"a"}]}"#, NOW + 1).await.expect("put");
    store.catalog_put("gh", "tools/list", "p2", r#"{"tools":[{"name":"b"}]}"#, NOW).await.expect("put");
    let page = store.catalog_page("gh", "tools/list", "").await.expect("get");
    assert_eq!(page.as_deref(), Some(r#"{"tools":[{"name":"a"}]}"#));
    assert!(store.catalog_page("gh", "prompts/list", "").await.expect("get").is_none());
    assert!(store.catalog_page("jira", "tools/list", "").await.expect("get").is_none());
}

async fn flows_and_links_work_once(store: Store) {
    let flow = FlowRow {
        id: "f1".into(),
        server: "gh".into(),
        subject: "u1".into(),
        details: "{}".into(),
        sealed: sealed(2),
        created_at: NOW,
        expires_at: NOW + 600,
    };
    store.vault_flow_put(&flow).await.expect("put");
    let taken = store.vault_flow_take("f1").await.expect("take").expect("present");
    assert_eq!((taken.server.as_str(), taken.subject.as_str(), taken.sealed), ("gh", "u1", sealed(2)));
    assert!(store.vault_flow_take("f1").await.expect("take").is_none(), "a state works once");

    let link = LinkRow {
        id: "l1".into(),
        server: "gh".into(),
        subject: "u1".into(),
        details: "{}".into(),
        created_at: NOW,
        expires_at: NOW + 900,
    };
    store.vault_link_put(&link).await.expect("put");
    assert!(store.vault_link_use("l1", "gh", NOW + 901).await.expect("use").is_none(), "expired");
    assert!(store.vault_link_use("l1", "other", NOW + 1).await.expect("use").is_none(), "another server's path");
    assert_eq!(store.vault_link_peek("l1", "gh", NOW + 1).await.expect("peek").expect("valid").subject, "u1");
    assert_eq!(store.vault_link_use("l1", "gh", NOW + 1).await.expect("use").expect("valid").subject, "u1");
    assert!(store.vault_link_use("l1", "gh", NOW + 2).await.expect("use").is_none(), "a link works once");
}

async fn connections_keep_one_writer_per_generation(store: Store) {
    store.vault_connection_put(&connection("a", "u1")).await.expect("put");
    store.vault_connection_put(&connection("b", "u2")).await.expect("put");
    let a = store.vault_connection("gh", "u1").await.expect("get").expect("present");
    assert_eq!((a.generation, a.status.as_str()), (0, "active"));

    // Two refreshes that both saw generation 0: only the first is stored.
    assert!(store.vault_connection_refreshed("a", 0, &sealed(3), Some(NOW + 120), "repo", NOW).await.expect("update"));
    assert!(!store.vault_connection_refreshed("a", 0, &sealed(4), Some(NOW + 120), "repo", NOW).await.expect("update"));
    let a = store.vault_connection("gh", "u1").await.expect("get").expect("present");
    assert_eq!((a.generation, a.sealed, a.refreshed_at), (1, sealed(3), Some(NOW)));

    // A failure of tokens that were replaced meanwhile changes nothing.
    store.vault_connection_failed("a", 0, true, "invalid_grant").await.expect("fail");
    let a = store.vault_connection("gh", "u1").await.expect("get").expect("present");
    assert_eq!((a.status.as_str(), a.last_error.as_deref()), ("active", None), "the row moved on to generation 1");
    store.vault_connection_failed("a", 1, true, "invalid_grant").await.expect("fail");
    let a = store.vault_connection("gh", "u1").await.expect("get").expect("present");
    assert_eq!((a.status.as_str(), a.last_error.as_deref()), ("reconnect", Some("invalid_grant")));

    // A new authorization replaces the row and moves the generation on.
    store.vault_connection_put(&connection("a2", "u1")).await.expect("put");
    let a = store.vault_connection("gh", "u1").await.expect("get").expect("present");
    assert_eq!((a.id.as_str(), a.generation, a.status.as_str(), a.last_error), ("a2", 2, "active", None));

    assert_eq!(store.vault_connections(None).await.expect("list").len(), 2);
    assert_eq!(store.vault_connections(Some("u2")).await.expect("list")[0].id, "b");
    assert!(store.vault_connection_delete("b").await.expect("delete"));
    assert!(!store.vault_connection_delete("b").await.expect("delete"));
}

async fn registrations_are_per_issuer(store: Store) {
    let row = |id: &str, issuer: &str| ClientRow {
        id: id.into(),
        server: "gh".into(),
        issuer: issuer.into(),
        client_id: format!("client-{id}"),
        auth_method: "none".into(),
        redirect_uri: "https://gw/oauth/callback/gh".into(),
        sealed: sealed(5),
        created_at: NOW,
    };
    store.vault_client_put(&row("1", "https://as-a")).await.expect("put");
    store.vault_client_put(&row("2", "https://as-b")).await.expect("put");
    let cb = "https://gw/oauth/callback/gh";
    assert_eq!(store.vault_client("gh", "https://as-a", cb).await.expect("get").expect("a").client_id, "client-1");
    store.vault_client_delete("gh", "https://as-a", "client-other").await.expect("delete");
    assert!(store.vault_client("gh", "https://as-a", cb).await.expect("get").is_some(), "another client id stays");
    store.vault_client_put(&row("3", "https://as-a")).await.expect("a concurrent registration");
    assert_eq!(
        store.vault_client("gh", "https://as-a", cb).await.expect("get").expect("a").client_id,
        "client-1",
        "the first registration stored wins"
    );
    assert_eq!(store.vault_client_by_id("gh", "https://as-a", "client-1").await.expect("get").expect("by id").id, "1");
    store.vault_client_delete("gh", "https://as-a", "client-1").await.expect("delete");
    assert!(store.vault_client("gh", "https://as-a", cb).await.expect("get").is_none());
    assert!(store.vault_client("gh", "https://as-b", cb).await.expect("get").is_some(), "another issuer's stays");
}

/// Replicas sharing PostgreSQL refresh one connection at a time: a second lock on the same
/// connection waits until the first is released; another connection's does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refresh_lock_serialises_replicas_on_postgres() {
    let (store, _pg, _dir) = postgres().await;
    let Store::Postgres(pool) = store else { panic!("a PostgreSQL store") };
    let first = refresh_lock(&pool, "gh", "u1").await.expect("lock");
    let other = pool.clone();
    let waiting = tokio::spawn(async move { refresh_lock(&other, "gh", "u1").await.map(|_| true) });
    let other_connection = tokio::time::timeout(Duration::from_secs(5), refresh_lock(&pool, "gh", "u2"))
        .await
        .expect("another connection's lock is free");
    drop(other_connection);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the second lock waits while the first is held");
    drop(first);
    let got = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("released").expect("task");
    assert!(got.expect("lock"));
}
