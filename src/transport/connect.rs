//! The browser side of upstream OAuth: `/connect/{server}?link=…` (a single-use connect link
//! made for one person) sends the browser to the upstream's authorization server;
//! `/oauth/callback/{server}` (one per server, R91) completes the flow and shows a plain page;
//! `/oauth/client-metadata.json` is the gateway's Client ID Metadata Document (R84), served
//! when the public URL is https.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use crate::app::AppState;
use crate::vault::VaultError;

/// `GET /connect/{server}?link=…`.
pub async fn connect(
    State(app): State<AppState>,
    Path(server): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(vault) = app.vault() else { return page(StatusCode::NOT_FOUND, "Not found", "No OAuth upstream here.") };
    let Some(link) = q.get("link") else {
        return page(StatusCode::BAD_REQUEST, "Connect link incomplete", "This link has no secret; ask for a new one.");
    };
    match vault.begin_from_link(&server, link).await {
        Ok(url) => {
            let mut resp = StatusCode::FOUND.into_response();
            if let Ok(v) = HeaderValue::from_str(url.as_str()) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            secure(resp)
        }
        Err(e) => failure(&server, e),
    }
}

/// `GET /oauth/callback/{server}?code=…&state=…` (or `error=…`).
pub async fn callback(
    State(app): State<AppState>,
    Path(server): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(vault) = app.vault() else { return page(StatusCode::NOT_FOUND, "Not found", "No OAuth upstream here.") };
    match vault.complete(&server, &q).await {
        Ok(c) => {
            let scopes = if c.scopes.is_empty() { "(none named)".to_owned() } else { c.scopes.join(" ") };
            page(
                StatusCode::OK,
                "Connected",
                &format!(
                    "Portcullis is now connected to {server} (scopes: {scopes}). You can close this page and retry."
                ),
            )
        }
        Err(e) => failure(&server, e),
    }
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
    let status = match e {
        VaultError::Flow { .. } | VaultError::Denied { .. } | VaultError::Config { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    };
    page(status, "Connection failed", &format!("Connecting to {server} failed: {e}"))
}

/// A minimal page; nothing here may be framed, cached or leak a referrer (R111, R118).
fn page(status: StatusCode, title: &str, text: &str) -> Response {
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head>\
         <body><h1>{t}</h1><p>{x}</p></body></html>",
        t = escape(title),
        x = escape(text)
    );
    let resp = (status, [(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"))], body);
    secure(resp.into_response())
}

fn secure(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"));
    resp
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
