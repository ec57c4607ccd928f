//! Vault rows: dynamically registered clients, authorization flows in progress, connections
//! (encrypted upstream tokens) and connect links. Values are sealed by the caller
//! (`crate::vault`); this module moves rows.

use sqlx::Row;

use super::{Store, StoreError};
use crate::crypto::Sealed;
use crate::keys::KeyId;
use crate::store::rotate::EncryptedTable;

/// Encrypted vault tables (joined to key rotation).
pub const CLIENTS_TABLE: EncryptedTable = EncryptedTable { table: "vault_clients", id_column: "id" };
/// See [`CLIENTS_TABLE`].
pub const FLOWS_TABLE: EncryptedTable = EncryptedTable { table: "vault_flows", id_column: "id" };
/// See [`CLIENTS_TABLE`].
pub const CONNECTIONS_TABLE: EncryptedTable = EncryptedTable { table: "vault_connections", id_column: "id" };

/// A dynamically registered client.
#[derive(Debug, Clone)]
pub struct ClientRow {
    /// Row id.
    pub id: String,
    /// Upstream server name.
    pub server: String,
    /// The issuer that registered it.
    pub issuer: String,
    /// The `client_id`.
    pub client_id: String,
    /// The token endpoint authentication method.
    pub auth_method: String,
    /// The redirect URI it was registered with.
    pub redirect_uri: String,
    /// The client secret (JSON), sealed.
    pub sealed: Sealed,
    /// Seconds since the epoch.
    pub created_at: i64,
}

/// An authorization flow in progress.
#[derive(Debug, Clone)]
pub struct FlowRow {
    /// SHA-256 of the `state`, hex.
    pub id: String,
    /// Upstream server name.
    pub server: String,
    /// Who is connecting (`''` for a shared connection).
    pub subject: String,
    /// Non-secret details (JSON).
    pub details: String,
    /// The PKCE verifier (JSON), sealed.
    pub sealed: Sealed,
    /// Seconds since the epoch.
    pub created_at: i64,
    /// Seconds since the epoch.
    pub expires_at: i64,
}

/// One connection.
#[derive(Debug, Clone)]
pub struct ConnectionRow {
    /// Row id.
    pub id: String,
    /// Upstream server name.
    pub server: String,
    /// Whose (`''` for a shared connection).
    pub subject: String,
    /// The issuer of its tokens.
    pub issuer: String,
    /// The client the tokens were issued to.
    pub client_id: String,
    /// Granted scopes, space-separated.
    pub scopes: String,
    /// Non-secret details (JSON: endpoints, resource, auth method).
    pub details: String,
    /// The tokens (JSON), sealed.
    pub sealed: Sealed,
    /// When the access token expires, if known.
    pub expires_at: Option<i64>,
    /// `active` or `reconnect`.
    pub status: String,
    /// Grows with every change of the tokens.
    pub generation: i64,
    /// Seconds since the epoch.
    pub created_at: i64,
    /// Last successful refresh.
    pub refreshed_at: Option<i64>,
    /// Last error (never a token).
    pub last_error: Option<String>,
}

pub(super) fn sealed(key_id: String, ciphertext: Vec<u8>) -> Result<Sealed, sqlx::Error> {
    let key_id = KeyId::parse(&key_id).map_err(|e| sqlx::Error::Decode(e.to_string().into()))?;
    Ok(Sealed { key_id, ciphertext })
}

const CONNECTION_COLUMNS: &str = "id, server, subject, issuer, client_id, scopes, details, key_id, ciphertext, \
     expires_at, status, generation, created_at, refreshed_at, last_error";

fn connection<R: Row>(r: &R) -> Result<ConnectionRow, sqlx::Error>
where
    usize: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Vec<u8>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(ConnectionRow {
        id: r.try_get(0)?,
        server: r.try_get(1)?,
        subject: r.try_get(2)?,
        issuer: r.try_get(3)?,
        client_id: r.try_get(4)?,
        scopes: r.try_get(5)?,
        details: r.try_get(6)?,
        sealed: sealed(r.try_get(7)?, r.try_get(8)?)?,
        expires_at: r.try_get(9)?,
        status: r.try_get(10)?,
        generation: r.try_get(11)?,
        created_at: r.try_get(12)?,
        refreshed_at: r.try_get(13)?,
        last_error: r.try_get(14)?,
    })
}

impl Store {
    /// The client registered for `server` at `issuer` with `redirect_uri`.
    pub async fn vault_client(
        &self,
        server: &str,
        issuer: &str,
        redirect_uri: &str,
    ) -> Result<Option<ClientRow>, StoreError> {
        self.vault_client_where("redirect_uri", server, issuer, redirect_uri).await
    }

    /// The registration of `client_id` for `server` at `issuer` (the one a flow or a
    /// connection used, even if a newer one replaced it).
    pub async fn vault_client_by_id(
        &self,
        server: &str,
        issuer: &str,
        client_id: &str,
    ) -> Result<Option<ClientRow>, StoreError> {
        self.vault_client_where("client_id", server, issuer, client_id).await
    }

    async fn vault_client_where(
        &self,
        column: &'static str,
        server: &str,
        issuer: &str,
        value: &str,
    ) -> Result<Option<ClientRow>, StoreError> {
        let sql = format!(
            "SELECT id, server, issuer, client_id, auth_method, redirect_uri, key_id, ciphertext, created_at \
             FROM vault_clients WHERE server = $1 AND issuer = $2 AND {column} = $3"
        );
        let row = crate::on_pool!(self, p => {
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(server)
            .bind(issuer)
            .bind(value)
            .fetch_optional(p)
            .await?;
            row.map(|r| {
                Ok::<_, sqlx::Error>(ClientRow {
                    id: r.try_get(0)?,
                    server: r.try_get(1)?,
                    issuer: r.try_get(2)?,
                    client_id: r.try_get(3)?,
                    auth_method: r.try_get(4)?,
                    redirect_uri: r.try_get(5)?,
                    sealed: sealed(r.try_get(6)?, r.try_get(7)?)?,
                    created_at: r.try_get(8)?,
                })
            })
            .transpose()?
        });
        Ok(row)
    }

    /// Stores a registration unless one for the same server, issuer and URI exists (a
    /// concurrent registration won: read it back with [`Store::vault_client`] and use that).
    pub async fn vault_client_put(&self, c: &ClientRow) -> Result<(), StoreError> {
        crate::on_pool!(self, p => sqlx::query(
            "INSERT INTO vault_clients (id, server, issuer, client_id, auth_method, redirect_uri, key_id, ciphertext, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (server, issuer, redirect_uri) DO NOTHING",
        )
        .bind(&c.id)
        .bind(&c.server)
        .bind(&c.issuer)
        .bind(&c.client_id)
        .bind(&c.auth_method)
        .bind(&c.redirect_uri)
        .bind(c.sealed.key_id.as_str())
        .bind(c.sealed.ciphertext.as_slice())
        .bind(c.created_at)
        .execute(p)
        .await?
        .rows_affected());
        Ok(())
    }

    /// Forgets the registration `client_id` of `server` at `issuer` (the issuer no longer
    /// knows it); a newer registration stays.
    pub async fn vault_client_delete(&self, server: &str, issuer: &str, client_id: &str) -> Result<(), StoreError> {
        crate::on_pool!(self, p => sqlx::query(
            "DELETE FROM vault_clients WHERE server = $1 AND issuer = $2 AND client_id = $3",
        )
            .bind(server)
            .bind(issuer)
            .bind(client_id)
            .execute(p)
            .await?
            .rows_affected());
        Ok(())
    }

    /// Stores a flow in progress and drops expired ones.
    pub async fn vault_flow_put(&self, f: &FlowRow) -> Result<(), StoreError> {
        crate::on_pool!(self, p => {
            sqlx::query("DELETE FROM vault_flows WHERE expires_at < $1").bind(f.created_at).execute(p).await?;
            sqlx::query(
                "INSERT INTO vault_flows (id, server, subject, details, key_id, ciphertext, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&f.id)
            .bind(&f.server)
            .bind(&f.subject)
            .bind(&f.details)
            .bind(f.sealed.key_id.as_str())
            .bind(f.sealed.ciphertext.as_slice())
            .bind(f.created_at)
            .bind(f.expires_at)
            .execute(p)
            .await?
            .rows_affected()
        });
        Ok(())
    }

    /// Takes (reads and deletes, in one statement) the flow `id`: a state works once.
    pub async fn vault_flow_take(&self, id: &str) -> Result<Option<FlowRow>, StoreError> {
        let row = crate::on_pool!(self, p => {
            let row = sqlx::query(
                "DELETE FROM vault_flows WHERE id = $1 \
                 RETURNING id, server, subject, details, key_id, ciphertext, created_at, expires_at",
            )
            .bind(id)
            .fetch_optional(p)
            .await?;
            row.map(|r| {
                Ok::<_, sqlx::Error>(FlowRow {
                    id: r.try_get(0)?,
                    server: r.try_get(1)?,
                    subject: r.try_get(2)?,
                    details: r.try_get(3)?,
                    sealed: sealed(r.try_get(4)?, r.try_get(5)?)?,
                    created_at: r.try_get(6)?,
                    expires_at: r.try_get(7)?,
                })
            })
            .transpose()?
        });
        Ok(row)
    }

    /// The connection of `subject` to `server`.
    pub async fn vault_connection(&self, server: &str, subject: &str) -> Result<Option<ConnectionRow>, StoreError> {
        let sql = format!("SELECT {CONNECTION_COLUMNS} FROM vault_connections WHERE server = $1 AND subject = $2");
        let row = crate::on_pool!(self, p => {
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(server)
                .bind(subject)
                .fetch_optional(p)
                .await?;
            row.as_ref().map(connection).transpose()?
        });
        Ok(row)
    }

    /// Connections, all or one subject's, by server then subject.
    pub async fn vault_connections(&self, subject: Option<&str>) -> Result<Vec<ConnectionRow>, StoreError> {
        let filter = if subject.is_some() { "WHERE subject = $1 " } else { "" };
        let sql = format!("SELECT {CONNECTION_COLUMNS} FROM vault_connections {filter}ORDER BY server, subject");
        let rows = crate::on_pool!(self, p => {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            if let Some(s) = subject {
                q = q.bind(s);
            }
            let rows = q.fetch_all(p).await?;
            rows.iter().map(connection).collect::<Result<Vec<_>, _>>()?
        });
        Ok(rows)
    }

    /// Creates or replaces the connection of `c.subject` to `c.server` (a new authorization).
    pub async fn vault_connection_put(&self, c: &ConnectionRow) -> Result<(), StoreError> {
        crate::on_pool!(self, p => sqlx::query(
            "INSERT INTO vault_connections (id, server, subject, issuer, client_id, scopes, details, key_id, \
             ciphertext, expires_at, status, generation, created_at, refreshed_at, last_error) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
             ON CONFLICT (server, subject) DO UPDATE SET id = excluded.id, issuer = excluded.issuer, \
             client_id = excluded.client_id, scopes = excluded.scopes, details = excluded.details, \
             key_id = excluded.key_id, ciphertext = excluded.ciphertext, expires_at = excluded.expires_at, \
             status = excluded.status, generation = vault_connections.generation + 1, \
             created_at = excluded.created_at, refreshed_at = excluded.refreshed_at, last_error = NULL",
        )
        .bind(&c.id)
        .bind(&c.server)
        .bind(&c.subject)
        .bind(&c.issuer)
        .bind(&c.client_id)
        .bind(&c.scopes)
        .bind(&c.details)
        .bind(c.sealed.key_id.as_str())
        .bind(c.sealed.ciphertext.as_slice())
        .bind(c.expires_at)
        .bind(&c.status)
        .bind(c.generation)
        .bind(c.created_at)
        .bind(c.refreshed_at)
        .bind(&c.last_error)
        .execute(p)
        .await?
        .rows_affected());
        Ok(())
    }

    /// Stores refreshed tokens if the row is still at `generation` (one statement: the rotated
    /// refresh token replaces the old one atomically); `false` if another refresh won.
    pub async fn vault_connection_refreshed(
        &self,
        id: &str,
        generation: i64,
        sealed: &Sealed,
        expires_at: Option<i64>,
        scopes: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let n = crate::on_pool!(self, p => sqlx::query(
            "UPDATE vault_connections SET key_id = $1, ciphertext = $2, expires_at = $3, scopes = $4, \
             refreshed_at = $5, status = 'active', last_error = NULL, generation = generation + 1 \
             WHERE id = $6 AND generation = $7",
        )
        .bind(sealed.key_id.as_str())
        .bind(sealed.ciphertext.as_slice())
        .bind(expires_at)
        .bind(scopes)
        .bind(now)
        .bind(id)
        .bind(generation)
        .execute(p)
        .await?
        .rows_affected());
        Ok(n == 1)
    }

    /// Records a failure of the connection's tokens at `generation`; with `reconnect`, the
    /// connection needs a new authorization. Nothing changes when the connection moved on
    /// meanwhile (another process refreshed it, or the person connected again): the failure
    /// was about tokens that are no longer in use.
    pub async fn vault_connection_failed(
        &self,
        id: &str,
        generation: i64,
        reconnect: bool,
        error: &str,
    ) -> Result<(), StoreError> {
        let status = if reconnect { "reconnect" } else { "active" };
        crate::on_pool!(self, p => sqlx::query(
            "UPDATE vault_connections SET status = CASE WHEN $1 = 'reconnect' THEN $1 ELSE status END, \
             last_error = $2 WHERE id = $3 AND generation = $4",
        )
        .bind(status)
        .bind(error)
        .bind(id)
        .bind(generation)
        .execute(p)
        .await?
        .rows_affected());
        Ok(())
    }

    /// Deletes a connection; `false` if it was gone. Moves the revocation epoch in the same
    /// transaction: access was taken away, so every gateway looks again (and stops the
    /// person's stdio processes).
    pub async fn vault_connection_delete(&self, id: &str) -> Result<bool, StoreError> {
        let n = crate::on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let n = sqlx::query("DELETE FROM vault_connections WHERE id = $1").bind(id).execute(&mut *tx).await?.rows_affected();
            if n > 0 {
                sqlx::query("UPDATE revocation_epoch SET epoch = epoch + 1 WHERE id = 1").execute(&mut *tx).await?;
            }
            tx.commit().await?;
            n
        });
        Ok(n > 0)
    }

    /// Drops every link and flow in progress of `subject` (offboarding: none may create a
    /// connection afterwards). Returns how many were dropped.
    pub async fn vault_forget_subject(&self, subject: &str) -> Result<u64, StoreError> {
        let n = crate::on_pool!(self, p => {
            let a = sqlx::query("DELETE FROM vault_links WHERE subject = $1").bind(subject).execute(p).await?.rows_affected();
            let b = sqlx::query("DELETE FROM vault_flows WHERE subject = $1").bind(subject).execute(p).await?.rows_affected();
            a + b
        });
        Ok(n)
    }

    /// Stores a connect link (and drops expired ones).
    pub async fn vault_link_put(&self, l: &LinkRow) -> Result<(), StoreError> {
        crate::on_pool!(self, p => {
            sqlx::query("DELETE FROM vault_links WHERE expires_at < $1").bind(l.created_at).execute(p).await?;
            sqlx::query(
                "INSERT INTO vault_links (id, server, subject, details, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&l.id)
            .bind(&l.server)
            .bind(&l.subject)
            .bind(&l.details)
            .bind(l.created_at)
            .bind(l.expires_at)
            .execute(p)
            .await?
            .rows_affected()
        });
        Ok(())
    }

    /// The link `id` for `server` if it is unused and unexpired at `now` (not using it).
    pub async fn vault_link_peek(&self, id: &str, server: &str, now: i64) -> Result<Option<LinkRow>, StoreError> {
        self.vault_link_query(
            "SELECT id, server, subject, details, created_at, expires_at FROM vault_links \
             WHERE id = $1 AND used_at IS NULL AND expires_at >= $2 AND server = $3",
            id,
            server,
            now,
        )
        .await
    }

    /// Uses the link `id` for `server` at `now`: returns it if it existed, was unused and
    /// unexpired, and marks it used in the same statement (a link works once).
    pub async fn vault_link_use(&self, id: &str, server: &str, now: i64) -> Result<Option<LinkRow>, StoreError> {
        self.vault_link_query(
            "UPDATE vault_links SET used_at = $2 WHERE id = $1 AND used_at IS NULL AND expires_at >= $2 \
             AND server = $3 RETURNING id, server, subject, details, created_at, expires_at",
            id,
            server,
            now,
        )
        .await
    }

    async fn vault_link_query(
        &self,
        sql: &'static str,
        id: &str,
        server: &str,
        now: i64,
    ) -> Result<Option<LinkRow>, StoreError> {
        let row = crate::on_pool!(self, p => {
            let row = sqlx::query(sql).bind(id).bind(now).bind(server).fetch_optional(p).await?;
            row.map(|r| {
                Ok::<_, sqlx::Error>(LinkRow {
                    id: r.try_get(0)?,
                    server: r.try_get(1)?,
                    subject: r.try_get(2)?,
                    details: r.try_get(3)?,
                    created_at: r.try_get(4)?,
                    expires_at: r.try_get(5)?,
                })
            })
            .transpose()?
        });
        Ok(row)
    }
}

impl Store {
    /// Across processes sharing a SQLite file, one refresh per connection at a time: takes the
    /// refresh lease of `subject`'s connection to `server` for `owner` until `until` (unix
    /// seconds), when nobody holds it or the holder's lease ran out. One conditional `UPDATE`,
    /// which SQLite runs under its write lock, so exactly one process gets it. `Ok(None)` when
    /// there is no such connection (nothing to refresh), else whether it was taken.
    pub async fn vault_refresh_lease_take(
        &self,
        server: &str,
        subject: &str,
        owner: &str,
        now: i64,
        until: i64,
    ) -> Result<Option<bool>, StoreError> {
        let taken = crate::on_pool!(self, p => sqlx::query(
            "UPDATE vault_connections SET refresh_lease_owner = $1, refresh_lease_until = $2 \
             WHERE server = $3 AND subject = $4 \
             AND (refresh_lease_until IS NULL OR refresh_lease_until <= $5 OR refresh_lease_owner = $1)",
        )
        .bind(owner)
        .bind(until)
        .bind(server)
        .bind(subject)
        .bind(now)
        .execute(p)
        .await?
        .rows_affected());
        if taken == 1 {
            return Ok(Some(true));
        }
        Ok(self.vault_connection(server, subject).await?.map(|_| false))
    }

    /// Gives back a lease taken with [`Store::vault_refresh_lease_take`].
    pub async fn vault_refresh_lease_release(
        &self,
        server: &str,
        subject: &str,
        owner: &str,
    ) -> Result<(), StoreError> {
        crate::on_pool!(self, p => sqlx::query(
            "UPDATE vault_connections SET refresh_lease_owner = NULL, refresh_lease_until = NULL \
             WHERE server = $1 AND subject = $2 AND refresh_lease_owner = $3",
        )
        .bind(server)
        .bind(subject)
        .bind(owner)
        .execute(p)
        .await?
        .rows_affected());
        Ok(())
    }
}

/// Across replicas sharing PostgreSQL, one refresh per connection at a time: a transaction on
/// `pool` holding an advisory lock on the connection's key, released when the returned guard
/// drops. Processes sharing a SQLite file use the connection's refresh lease instead
/// ([`Store::vault_refresh_lease_take`]).
pub async fn refresh_lock(
    pool: &sqlx::PgPool,
    server: &str,
    subject: &str,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7))")
        .bind(format!("vault:{server}\n{subject}"))
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// A connect link.
#[derive(Debug, Clone)]
pub struct LinkRow {
    /// SHA-256 of the link's secret, hex.
    pub id: String,
    /// Upstream server name.
    pub server: String,
    /// Who it was made for.
    pub subject: String,
    /// What to ask for (JSON).
    pub details: String,
    /// Seconds since the epoch.
    pub created_at: i64,
    /// Seconds since the epoch.
    pub expires_at: i64,
}
