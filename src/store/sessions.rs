//! Rows behind client sessions and listings: the upstream side of a session the gateway
//! re-opened (`mcp_session_upstreams`) and the listings last seen from an OAuth upstream
//! (`server_catalog`). Both are read rarely (a replica meeting a re-opened session for the
//! first time, a person who has not connected yet) and written only when they change.

use sqlx::Row;

use super::{Store, StoreError};
use crate::crypto::Sealed;

/// The table of re-opened sessions, for the ciphertexts' associated data.
pub const SESSION_UPSTREAMS_TABLE: &str = "mcp_session_upstreams";

/// Rows of re-opened sessions untouched this long are dropped (a session still in use meets
/// its upstream's 404 and re-opens again).
pub const SESSION_UPSTREAM_TTL_SECS: i64 = 30 * 24 * 3600;

/// The upstream side of one re-opened session, sealed.
#[derive(Debug, Clone)]
pub struct SessionUpstreamRow {
    /// The session's random key (`SessionState::key`).
    pub session_key: String,
    /// The server it belongs to.
    pub server: String,
    /// The upstream's session id and revision (JSON), encrypted and bound to the row.
    pub sealed: Sealed,
    /// Grows with every re-open, so two replicas re-opening at once agree on one.
    pub generation: i64,
    /// When it was written (unix seconds).
    pub updated_at: i64,
}

impl Store {
    /// The re-opened upstream side of session `key`, if any.
    pub async fn session_upstream(&self, key: &str) -> Result<Option<SessionUpstreamRow>, StoreError> {
        let sql = "SELECT session_key, server, key_id, ciphertext, generation, updated_at \
                   FROM mcp_session_upstreams WHERE session_key = $1";
        let row = crate::on_pool!(self, p => {
            let row = sqlx::query(sql).bind(key).fetch_optional(p).await?;
            row.map(|r| -> Result<SessionUpstreamRow, sqlx::Error> {
                Ok(SessionUpstreamRow {
                    session_key: r.try_get(0)?,
                    server: r.try_get(1)?,
                    sealed: super::vault::sealed(r.try_get(2)?, r.try_get(3)?)?,
                    generation: r.try_get(4)?,
                    updated_at: r.try_get(5)?,
                })
            })
            .transpose()?
        });
        Ok(row)
    }

    /// Stores a re-opened upstream side if the session's row is still at `previous` (`None`:
    /// no row yet). `false` when another process re-opened first: read its row instead.
    /// Rows older than [`SESSION_UPSTREAM_TTL_SECS`] go at the same time.
    pub async fn session_upstream_put(
        &self,
        row: &SessionUpstreamRow,
        previous: Option<i64>,
    ) -> Result<bool, StoreError> {
        let n = crate::on_pool!(self, p => {
            sqlx::query("DELETE FROM mcp_session_upstreams WHERE updated_at < $1")
                .bind(row.updated_at - SESSION_UPSTREAM_TTL_SECS)
                .execute(p)
                .await?;
            let sql = match previous {
                None => "INSERT INTO mcp_session_upstreams \
                         (session_key, server, key_id, ciphertext, generation, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (session_key) DO NOTHING",
                Some(_) => "UPDATE mcp_session_upstreams SET server = $2, key_id = $3, ciphertext = $4, \
                            generation = $5, updated_at = $6 WHERE session_key = $1 AND generation = $7",
            };
            let q = sqlx::query(sql)
                .bind(&row.session_key)
                .bind(&row.server)
                .bind(row.sealed.key_id.as_str())
                .bind(row.sealed.ciphertext.as_slice())
                .bind(row.generation)
                .bind(row.updated_at);
            let q = match previous {
                Some(g) => q.bind(g),
                None => q,
            };
            q.execute(p).await?.rows_affected()
        });
        Ok(n == 1)
    }

    /// Forgets the re-opened upstream side of session `key` (the client ended the session).
    pub async fn session_upstream_delete(&self, key: &str) -> Result<(), StoreError> {
        crate::on_pool!(self, p => sqlx::query("DELETE FROM mcp_session_upstreams WHERE session_key = $1")
            .bind(key)
            .execute(p)
            .await?
            .rows_affected());
        Ok(())
    }

    /// The page `page` (`""` for the first) of `method`'s result last seen from `server`.
    pub async fn catalog_page(&self, server: &str, method: &str, page: &str) -> Result<Option<String>, StoreError> {
        let sql = "SELECT body FROM server_catalog WHERE server = $1 AND method = $2 AND page = $3";
        let body = crate::on_pool!(self, p => sqlx::query_scalar(sql)
            .bind(server)
            .bind(method)
            .bind(page)
            .fetch_optional(p)
            .await?);
        Ok(body)
    }

    /// Stores (or replaces) a page of `method`'s result from `server`.
    pub async fn catalog_put(
        &self,
        server: &str,
        method: &str,
        page: &str,
        body: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        crate::on_pool!(self, p => sqlx::query(
            "INSERT INTO server_catalog (server, method, page, body, updated_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (server, method, page) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at",
        )
        .bind(server)
        .bind(method)
        .bind(page)
        .bind(body)
        .bind(now)
        .execute(p)
        .await?
        .rows_affected());
        Ok(())
    }
}
