//! The browser side of upstream OAuth: `/connect/{server}?link=…` (a single-use connect link
//! made for one person) shows whose account it connects; the person's confirmation (a POST
//! from that page) uses the link, binds the flow to the browser with a cookie and sends the
//! browser to the upstream's authorization server;
//! `/oauth/callback/{server}` (one per server, R91) completes the flow and shows a plain page;
//! `/oauth/client-metadata.json` is the gateway's Client ID Metadata Document (R84), served
//! when the public URL is https.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use crate::state::AppState;
use crate::vault::VaultError;

/// The cookie that binds a flow to the browser that started it.
const BROWSER_COOKIE: &str = "portcullis_connect";

/// `GET /connect/{server}?link=…`: a page that says whose account this connects and to what,
/// and asks the person to continue (a link preview or a prefetch uses nothing up).
pub async fn connect(
    State(app): State<AppState>,
    Path(server): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(vault) = app.vault() else { return page(StatusCode::NOT_FOUND, "Not found", "No OAuth upstream here.") };
    let Some(link) = q.get("link") else {
        return page(StatusCode::BAD_REQUEST, "Connect link incomplete", "This link has no secret; ask for a new one.");
    };
    let subject = match vault.peek_link(&server, link).await {
        Ok(s) => s,
        Err(e) => return failure(&server, e),
    };
    let whose = whose(&app, &subject).await;
    let body = format!(
        "<p>This connects {whose} to <b>{server}</b> through Portcullis. Calls that Portcullis makes to \
         {server} for {whose} will act as the account you sign in with next.</p>\
         <p>Continue only if you are the person named here and you opened a link that Portcullis gave \
         you.</p><form method=\"post\" action=\"{action}\"><input type=\"hidden\" name=\"link\" value=\"{link}\">\
         <button type=\"submit\">Continue to sign in</button></form>",
        whose = escape(&whose),
        server = escape(&server),
        action = escape(&format!("{}/connect/{server}", app.public_url().path().trim_end_matches('/'))),
        link = escape(link),
    );
    html(StatusCode::OK, &format!("Connect {server}"), &body)
}

/// `POST /connect/{server}` (form `link=…`), from the page above: uses the link, binds the
/// flow to this browser with a cookie, and sends the browser to the authorization server.
pub async fn confirm(
    State(app): State<AppState>,
    Path(server): Path<String>,
    headers: http::HeaderMap,
    axum::Form(form): axum::Form<HashMap<String, String>>,
) -> Response {
    let Some(vault) = app.vault() else { return page(StatusCode::NOT_FOUND, "Not found", "No OAuth upstream here.") };
    // Only the gateway's own page may post here: another site cannot start a flow in a
    // visitor's browser (R111).
    let own = app.public_url().origin().ascii_serialization();
    if headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) != Some(own.as_str()) {
        return page(StatusCode::FORBIDDEN, "Refused", "Connections start from Portcullis' own page.");
    }
    let Some(link) = form.get("link") else {
        return page(StatusCode::BAD_REQUEST, "Connect link incomplete", "This link has no secret; ask for a new one.");
    };
    let mut secret = [0u8; 32];
    if getrandom::fill(&mut secret).is_err() {
        return page(StatusCode::INTERNAL_SERVER_ERROR, "Connection failed", "No randomness available.");
    }
    let browser = secret.iter().map(|b| format!("{b:02x}")).collect::<String>();
    match vault.begin_from_link(&server, link, Some(&browser)).await {
        Ok(url) => {
            let mut resp = StatusCode::SEE_OTHER.into_response();
            if let Ok(v) = HeaderValue::from_str(url.as_str()) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            let secure = if app.public_url().scheme() == "https" { "; Secure" } else { "" };
            let path = format!("{}/oauth/callback/{server}", app.public_url().path().trim_end_matches('/'));
            let cookie =
                format!("{BROWSER_COOKIE}={browser}; Path={path}; HttpOnly; SameSite=Lax; Max-Age=600{secure}");
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            secure_headers(resp)
        }
        Err(e) => failure(&server, e),
    }
}

/// `GET /oauth/callback/{server}?code=…&state=…` (or `error=…`).
pub async fn callback(
    State(app): State<AppState>,
    Path(server): Path<String>,
    headers: http::HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(vault) = app.vault() else { return page(StatusCode::NOT_FOUND, "Not found", "No OAuth upstream here.") };
    let browser = cookie(&headers, BROWSER_COOKIE);
    let result = vault.complete(&server, &q, browser.as_deref()).await;
    audit_connect(&app, &server, &result).await;
    let mut resp = match result {
        Ok(c) => {
            let whose = whose(&app, &c.subject).await;
            let scopes = if c.scopes.is_empty() { "(none named)".to_owned() } else { c.scopes.join(" ") };
            page(
                StatusCode::OK,
                "Connected",
                &format!(
                    "Portcullis is now connected to {server} for {whose} (scopes: {scopes}). You can close this page and retry."
                ),
            )
        }
        Err(e) => failure(&server, e),
    };
    let path = format!("{}/oauth/callback/{server}", app.public_url().path().trim_end_matches('/'));
    if let Ok(v) = HeaderValue::from_str(&format!("{BROWSER_COOKIE}=; Path={path}; Max-Age=0")) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// One audit record per completed (or refused) connection: who, which server, which scopes
/// (R116: elevations are recorded).
async fn audit_connect(app: &AppState, server: &str, result: &Result<crate::vault::Connected, VaultError>) {
    use crate::audit::{Arguments, Decision, Record};
    let (decision, subject, details) = match result {
        Ok(c) => (
            Decision::Allow,
            Some(c.subject.clone()),
            serde_json::json!({"scopes": c.scopes, "expires_at": c.expires_at}),
        ),
        Err(e) => (Decision::Deny, None, serde_json::json!({"reason": e.to_string()})),
    };
    let name = match &subject {
        Some(s) if !s.is_empty() => app.store().principal_name(s).await.ok().flatten(),
        _ => None,
    };
    // A refused callback has nobody behind it: recorded within its address's record budget.
    if subject.is_none() && !crate::layers::may_record_unauthenticated() {
        return;
    }
    let request_id =
        crate::layers::RequestId::current().map_or_else(|| uuid::Uuid::now_v7().to_string(), |id| id.to_string());
    let record = Record {
        principal_id: subject.filter(|s| !s.is_empty()),
        principal_name: name,
        server: Some(server.to_owned()),
        arguments: Arguments::new(details),
        ..Record::new(app.clock().unix_millis(), request_id, "vault/connect", decision)
    };
    app.audit().record(record);
}

/// `the shared connection`, or `user alice`.
async fn whose(app: &AppState, subject: &str) -> String {
    if subject.is_empty() {
        return "the shared connection".to_owned();
    }
    match app.store().principal_name(subject).await {
        Ok(Some(name)) => format!("Portcullis user {name}"),
        _ => "an unknown user".to_owned(),
    }
}

fn cookie(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// `GET /oauth/client-metadata.json`.
pub async fn client_metadata(State(app): State<AppState>) -> Response {
    match app.vault().and_then(|v| v.client_metadata_document()) {
        Some(doc) => axum::Json(doc).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

fn failure(server: &str, e: VaultError) -> Response {
    tracing::warn!(server, error = %e, "upstream connection failed");
    page(e.fault().row().status, "Connection failed", &format!("Connecting to {server} failed: {e}"))
}

/// A minimal page of text; nothing here may be framed, cached or leak a referrer (R111, R118).
fn page(status: StatusCode, title: &str, text: &str) -> Response {
    html(status, title, &format!("<p>{}</p>", escape(text)))
}

/// A page with `body` (already escaped HTML).
fn html(status: StatusCode, title: &str, body: &str) -> Response {
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head>\
         <body><h1>{t}</h1>{body}</body></html>",
        t = escape(title),
    );
    let resp = (status, [(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"))], body);
    secure_headers(resp.into_response())
}

fn secure_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        // No `form-action`: browsers apply it to the redirect that follows the form, which goes
        // to the authorization server.
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    );
    resp
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
