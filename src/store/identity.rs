//! Principals (users and service accounts), groups, and grant tokens.

use sqlx::Row;

use super::{Store, StoreError};
use crate::on_pool;

/// A user or service account as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrincipalRow {
    /// Stable id.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Whether it is a service account.
    pub service: bool,
    /// Group names, sorted.
    pub groups: Vec<String>,
    /// Creation time (unix seconds).
    pub created_at: i64,
    /// When it was disabled, if it was.
    pub disabled_at: Option<i64>,
}

/// A grant token as listed (never its value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    /// Token id.
    pub id: String,
    /// Owner's name.
    pub owner: String,
    /// Whether the owner is a service account.
    pub service: bool,
    /// The token's name (`laptop`).
    pub name: String,
    /// Servers it is limited to; `None` means every server.
    pub servers: Option<Vec<String>>,
    /// Creation time.
    pub created_at: i64,
    /// Expiry time.
    pub expires_at: Option<i64>,
    /// Last use (updated at most once a minute).
    pub last_used_at: Option<i64>,
    /// Revocation time.
    pub revoked_at: Option<i64>,
}

/// What authentication needs to know about a presented token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenAuth {
    /// Token id.
    pub token_id: String,
    /// Owner id.
    pub principal_id: String,
    /// Owner name.
    pub principal_name: String,
    /// Whether the owner is a service account.
    pub service: bool,
    /// Whether the owner is disabled.
    pub disabled: bool,
    /// Owner's groups.
    pub groups: Vec<String>,
    /// Servers the token is limited to.
    pub servers: Option<Vec<String>>,
    /// Expiry time.
    pub expires_at: Option<i64>,
    /// Revocation time.
    pub revoked_at: Option<i64>,
    /// Last use.
    pub last_used_at: Option<i64>,
}

impl TokenAuth {
    /// Whether this token may call `server` at `now`.
    pub fn usable_for(&self, server: &str, now: u64) -> bool {
        self.usable_at(now) && self.servers.as_ref().is_none_or(|s| s.iter().any(|n| n == server))
    }

    /// Whether this token may call some server at `now`.
    pub fn usable_at(&self, now: u64) -> bool {
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        !self.disabled && self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }
}

/// A request the store refused for a reason the caller should show.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// The name is taken.
    #[error("{0} already exists")]
    Exists(String),
    /// No such principal, group or token.
    #[error("no {0}")]
    NotFound(String),
}

fn servers_text(servers: &Option<Vec<String>>) -> Option<String> {
    servers.as_ref().map(|s| serde_json::to_string(s).unwrap_or_else(|_| "[]".to_owned()))
}

fn servers_of(text: Option<String>) -> Option<Vec<String>> {
    text.map(|t| serde_json::from_str(&t).unwrap_or_default())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

impl Store {
    /// Adds a user (`service = false`) or service account, in the given (existing) groups.
    pub async fn principal_add(
        &self,
        name: &str,
        service: bool,
        groups: &[String],
        now: i64,
    ) -> Result<Result<PrincipalRow, IdentityError>, StoreError> {
        let id = uuid::Uuid::now_v7().to_string();
        let kind = if service { "service" } else { "user" };
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let inserted = sqlx::query("INSERT INTO principals (id, name, kind, created_at) VALUES ($1, $2, $3, $4)")
                .bind(&id).bind(name).bind(kind).bind(now)
                .execute(&mut *tx).await;
            match inserted {
                Err(e) if is_unique_violation(&e) => return Ok(Err(IdentityError::Exists(format!("'{name}'")))),
                other => other?,
            };
            for g in groups {
                let gid: Option<String> = sqlx::query_scalar("SELECT id FROM groups WHERE name = $1")
                    .bind(g).fetch_optional(&mut *tx).await?;
                let Some(gid) = gid else { return Ok(Err(IdentityError::NotFound(format!("group '{g}'")))) };
                sqlx::query("INSERT INTO group_members (group_id, principal_id) VALUES ($1, $2)")
                    .bind(gid).bind(&id).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        let mut groups = groups.to_vec();
        groups.sort();
        groups.dedup();
        Ok(Ok(PrincipalRow { id, name: name.to_owned(), service, groups, created_at: now, disabled_at: None }))
    }

    /// Users or service accounts, by name.
    pub async fn principal_list(&self, service: bool) -> Result<Vec<PrincipalRow>, StoreError> {
        let kind = if service { "service" } else { "user" };
        let rows = on_pool!(self, p => {
            let rows = sqlx::query(
                "SELECT id, name, created_at, disabled_at FROM principals WHERE kind = $1 ORDER BY name",
            )
            .bind(kind).fetch_all(p).await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let id: String = r.try_get("id")?;
                let groups: Vec<String> = sqlx::query_scalar(
                    "SELECT g.name FROM groups g JOIN group_members m ON m.group_id = g.id WHERE m.principal_id = $1 ORDER BY g.name",
                )
                .bind(&id).fetch_all(p).await?;
                out.push(PrincipalRow {
                    id,
                    name: r.try_get("name")?,
                    service,
                    groups,
                    created_at: r.try_get("created_at")?,
                    disabled_at: r.try_get("disabled_at")?,
                });
            }
            out
        });
        Ok(rows)
    }

    /// The name of the principal with id `id`.
    pub async fn principal_name(&self, id: &str) -> Result<Option<String>, StoreError> {
        let name: Option<String> = on_pool!(self, p => sqlx::query_scalar("SELECT name FROM principals WHERE id = $1")
            .bind(id)
            .fetch_optional(p)
            .await?);
        Ok(name)
    }

    /// Whether the principal with id `id` exists and is enabled.
    pub async fn principal_enabled(&self, id: &str) -> Result<bool, StoreError> {
        let row: Option<Option<i64>> = on_pool!(self, p => sqlx::query_scalar(
            "SELECT disabled_at FROM principals WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(p)
        .await?);
        Ok(matches!(row, Some(None)))
    }

    /// Disables a principal and revokes all its grant tokens in one transaction. Returns the
    /// number of tokens revoked.
    pub async fn principal_disable(&self, name: &str, now: i64) -> Result<Result<u64, IdentityError>, StoreError> {
        let revoked = on_pool!(self, p => {
            let mut tx = p.begin().await?;
            // A write first: SQLite then takes the write lock at once instead of upgrading a
            // read snapshot that a concurrent writer may have made stale.
            let id: Option<String> =
                sqlx::query_scalar("UPDATE principals SET disabled_at = COALESCE(disabled_at, $1) WHERE name = $2 RETURNING id")
                    .bind(now).bind(name).fetch_optional(&mut *tx).await?;
            let Some(id) = id else { return Ok(Err(IdentityError::NotFound(format!("principal '{name}'")))) };
            let revoked = sqlx::query("UPDATE grant_tokens SET revoked_at = $1 WHERE principal_id = $2 AND revoked_at IS NULL")
                .bind(now).bind(&id).execute(&mut *tx).await?.rows_affected();
            sqlx::query("UPDATE revocation_epoch SET epoch = epoch + 1 WHERE id = 1").execute(&mut *tx).await?;
            tx.commit().await?;
            revoked
        });
        Ok(Ok(revoked))
    }

    /// Re-enables a disabled principal (its revoked tokens stay revoked).
    pub async fn principal_enable(&self, name: &str) -> Result<Result<(), IdentityError>, StoreError> {
        let n = on_pool!(self, p => sqlx::query("UPDATE principals SET disabled_at = NULL WHERE name = $1")
            .bind(name).execute(p).await?.rows_affected());
        Ok(if n == 0 { Err(IdentityError::NotFound(format!("principal '{name}'"))) } else { Ok(()) })
    }

    /// Adds a group.
    pub async fn group_add(&self, name: &str, now: i64) -> Result<Result<(), IdentityError>, StoreError> {
        let id = uuid::Uuid::now_v7().to_string();
        let inserted = on_pool!(self, p => sqlx::query("INSERT INTO groups (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&id).bind(name).bind(now).execute(p).await.map(|r| r.rows_affected()));
        match inserted {
            Err(e) if is_unique_violation(&e) => Ok(Err(IdentityError::Exists(format!("group '{name}'")))),
            Err(e) => Err(e.into()),
            Ok(_) => Ok(Ok(())),
        }
    }

    /// Groups with their member names.
    pub async fn group_list(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        let out = on_pool!(self, p => {
            let names: Vec<(String, String)> = sqlx::query_as("SELECT id, name FROM groups ORDER BY name").fetch_all(p).await?;
            let mut out = Vec::with_capacity(names.len());
            for (id, name) in names {
                let members: Vec<String> = sqlx::query_scalar(
                    "SELECT pr.name FROM principals pr JOIN group_members m ON m.principal_id = pr.id WHERE m.group_id = $1 ORDER BY pr.name",
                )
                .bind(id).fetch_all(p).await?;
                out.push((name, members));
            }
            out
        });
        Ok(out)
    }

    /// Adds (`add = true`) or removes a principal from a group.
    pub async fn group_member(
        &self,
        group: &str,
        principal: &str,
        add: bool,
    ) -> Result<Result<(), IdentityError>, StoreError> {
        on_pool!(self, p => {
            let gid: Option<String> = sqlx::query_scalar("SELECT id FROM groups WHERE name = $1").bind(group).fetch_optional(p).await?;
            let Some(gid) = gid else { return Ok(Err(IdentityError::NotFound(format!("group '{group}'")))) };
            let pid: Option<String> = sqlx::query_scalar("SELECT id FROM principals WHERE name = $1").bind(principal).fetch_optional(p).await?;
            let Some(pid) = pid else { return Ok(Err(IdentityError::NotFound(format!("principal '{principal}'")))) };
            let sql = if add {
                "INSERT INTO group_members (group_id, principal_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
            } else {
                "DELETE FROM group_members WHERE group_id = $1 AND principal_id = $2"
            };
            sqlx::query(sql).bind(gid).bind(pid).execute(p).await?;
            sqlx::query("UPDATE revocation_epoch SET epoch = epoch + 1 WHERE id = 1").execute(p).await?;
        });
        Ok(Ok(()))
    }

    /// Stores a new grant token's hash for the principal named `owner`. Returns the token id.
    pub async fn token_create(
        &self,
        owner: &str,
        name: &str,
        hash: &[u8; 32],
        servers: &Option<Vec<String>>,
        expires_at: Option<i64>,
        now: i64,
    ) -> Result<Result<String, IdentityError>, StoreError> {
        let id = uuid::Uuid::now_v7().to_string();
        on_pool!(self, p => {
            let pid: Option<(String, Option<i64>)> = sqlx::query_as("SELECT id, disabled_at FROM principals WHERE name = $1")
                .bind(owner).fetch_optional(p).await?;
            let Some((pid, None)) = pid else { return Ok(Err(IdentityError::NotFound(format!("enabled principal '{owner}'")))) };
            sqlx::query(
                "INSERT INTO grant_tokens (id, principal_id, name, hash, servers, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&id).bind(pid).bind(name).bind(hash.as_slice()).bind(servers_text(servers)).bind(now).bind(expires_at)
            .execute(p).await?;
        });
        Ok(Ok(id))
    }

    /// Tokens, newest first, optionally only those of the principal named `owner`.
    pub async fn token_list(&self, owner: Option<&str>) -> Result<Vec<TokenRow>, StoreError> {
        let rows = on_pool!(self, p => {
            sqlx::query(
                "SELECT t.id, pr.name AS owner, pr.kind, t.name, t.servers, t.created_at, t.expires_at, t.last_used_at, t.revoked_at \
                 FROM grant_tokens t JOIN principals pr ON pr.id = t.principal_id \
                 WHERE ($1 IS NULL OR pr.name = $1) ORDER BY t.created_at DESC, t.id DESC",
            )
            .bind(owner).fetch_all(p).await?
            .into_iter()
            .map(|r| -> Result<TokenRow, sqlx::Error> {
                Ok(TokenRow {
                    id: r.try_get("id")?,
                    owner: r.try_get("owner")?,
                    service: r.try_get::<String, _>("kind")? == "service",
                    name: r.try_get("name")?,
                    servers: servers_of(r.try_get("servers")?),
                    created_at: r.try_get("created_at")?,
                    expires_at: r.try_get("expires_at")?,
                    last_used_at: r.try_get("last_used_at")?,
                    revoked_at: r.try_get("revoked_at")?,
                })
            })
            .collect::<Result<Vec<_>, _>>()?
        });
        Ok(rows)
    }

    /// Revokes a token by id; `false` if there is no such token.
    pub async fn token_revoke(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let n = on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let n = sqlx::query("UPDATE grant_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
                .bind(now).bind(id).execute(&mut *tx).await?.rows_affected();
            sqlx::query("UPDATE revocation_epoch SET epoch = epoch + 1 WHERE id = 1").execute(&mut *tx).await?;
            tx.commit().await?;
            n
        });
        Ok(n > 0)
    }

    /// Finds the token with this hash and what authentication needs about its owner.
    pub async fn token_lookup(&self, hash: &[u8; 32]) -> Result<Option<TokenAuth>, StoreError> {
        let found = on_pool!(self, p => {
            let row = sqlx::query(
                "SELECT t.id, t.principal_id, pr.name, pr.kind, pr.disabled_at, t.servers, t.expires_at, t.revoked_at, t.last_used_at \
                 FROM grant_tokens t JOIN principals pr ON pr.id = t.principal_id WHERE t.hash = $1",
            )
            .bind(hash.as_slice()).fetch_optional(p).await?;
            match row {
                None => None,
                Some(r) => {
                    let principal_id: String = r.try_get("principal_id")?;
                    let groups: Vec<String> = sqlx::query_scalar(
                        "SELECT g.name FROM groups g JOIN group_members m ON m.group_id = g.id WHERE m.principal_id = $1 ORDER BY g.name",
                    )
                    .bind(&principal_id).fetch_all(p).await?;
                    Some(TokenAuth {
                        token_id: r.try_get("id")?,
                        principal_id,
                        principal_name: r.try_get("name")?,
                        service: r.try_get::<String, _>("kind")? == "service",
                        disabled: r.try_get::<Option<i64>, _>("disabled_at")?.is_some(),
                        groups,
                        servers: servers_of(r.try_get("servers")?),
                        expires_at: r.try_get("expires_at")?,
                        revoked_at: r.try_get("revoked_at")?,
                        last_used_at: r.try_get("last_used_at")?,
                    })
                }
            }
        });
        Ok(found)
    }

    /// Records a token's use.
    pub async fn token_touch(&self, id: &str, now: i64) -> Result<(), StoreError> {
        on_pool!(self, p => sqlx::query("UPDATE grant_tokens SET last_used_at = $1 WHERE id = $2").bind(now).bind(id).execute(p).await?.rows_affected());
        Ok(())
    }
}

impl Store {
    /// The revocation epoch: it moves whenever access may have been taken away.
    pub async fn revocation_epoch(&self) -> Result<i64, StoreError> {
        Ok(
            on_pool!(self, p => sqlx::query_scalar("SELECT epoch FROM revocation_epoch WHERE id = 1").fetch_one(p).await?),
        )
    }
}
