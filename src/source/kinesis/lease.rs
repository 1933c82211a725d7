//! Shard leases in PostgreSQL: which process reads which shard, and since when.
//!
//! sluice already depends on PostgreSQL, and the checkpoint must be written in the sink's transaction
//! anyway, so the leases live beside the checkpoints in one row per shard instead of in a coordination
//! service of their own. A row is scoped by application and stream, so two applications read one
//! stream independently.
//!
//! Three rules make it safe:
//! - Expiry is judged by the database's clock (`now()`), never a process's, so clock drift between
//!   replicas cannot make two of them believe they hold the same shard.
//! - Every change of owner increments the row's epoch. A reader works under the (owner, epoch) it was
//!   given, and its checkpoint write succeeds only while the row still shows both (see
//!   [`super::checkpoint`]): a process that was frozen past its lease, or lost a shard to a
//!   rebalance, has its next commit rolled back instead of loading records twice.
//! - Every change is a compare-and-set on the row (its epoch, or its expiry), so two processes
//!   acting at once cannot both win.
//!
//! A process renews its leases every renewal interval and runs a round of [`Leases::acquire`] as
//! often; a process that dies stops renewing, and its leases become free `lease_duration` after its
//! last renewal, to be taken at another process's next round: within `lease_duration` plus one
//! renewal interval. How many leases a process takes is [`super::balance`]'s business.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use rand::seq::SliceRandom;
use tokio_postgres::Client;

use super::api::ShardDescription;
use super::balance::{self, LeaseView};
use super::position::{InitialPosition, StartPosition, start_position};
use super::sequence::SequenceNumber;
use crate::table_name::TableName;

/// The lease table's DDL. One row per shard of each (application, stream); `checkpoint` is the last
/// committed sequence number as a `numeric`, so PostgreSQL compares it as a number too.
pub fn lease_ddl(table: &TableName) -> Vec<String> {
    vec![format!(
        "CREATE TABLE IF NOT EXISTS {table}(
    application       text NOT NULL,
    stream            text NOT NULL,
    shard_id          text NOT NULL,
    parent_shard_ids  text[] NOT NULL DEFAULT '{{}}',
    owner             text,
    epoch             bigint NOT NULL DEFAULT 0,
    expires_at        timestamptz,
    checkpoint        numeric CHECK (checkpoint >= 0 AND checkpoint = trunc(checkpoint)),
    finished          boolean NOT NULL DEFAULT false,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (application, stream, shard_id)
)"
    )]
}

/// The rows one process works on: one table, one application, one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseScope {
    pub table: TableName,
    /// Names the reading application (`application` in config); each has its own leases and
    /// checkpoints.
    pub application: String,
    /// The stream's name.
    pub stream: String,
}

/// The right to read one shard and checkpoint it, valid while the row still shows this owner and
/// epoch. Cheap to clone: every message read under it carries one (behind an `Arc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseClaim {
    pub scope: Arc<LeaseScope>,
    pub shard_id: String,
    pub owner: Arc<str>,
    pub epoch: i64,
    /// How long the lease lives after each renewal. It also bounds how long a commit under this
    /// claim may keep the shard's row locked while its process is stopped (see
    /// [`super::checkpoint`]), so a frozen process cannot hold up the take-over of its shards.
    pub duration: Duration,
}

/// A lease just acquired, with what its reader needs to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenLease {
    pub claim: LeaseClaim,
    /// The shard's last committed sequence number.
    pub checkpoint: Option<SequenceNumber>,
    /// Whether this application has read one of the shard's parents to its end.
    pub parent_read_to_end: bool,
    /// The live owner it was taken from by a rebalance, if any.
    pub taken_from: Option<String>,
}

impl TakenLease {
    /// Where the shard's reader starts (see [`super::position`]).
    pub fn start_position(&self, initial: InitialPosition) -> StartPosition {
        start_position(self.checkpoint.as_ref(), self.parent_read_to_end, initial)
    }
}

/// One row as `sluice report` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseRow {
    pub shard_id: String,
    pub parent_shard_ids: Vec<String>,
    pub owner: Option<String>,
    pub epoch: i64,
    /// Seconds until the lease expires by the database's clock; negative once expired.
    pub expires_in_seconds: Option<f64>,
    pub checkpoint: Option<String>,
    pub finished: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease table: {}", crate::pg::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("lease table")]
    Connect(#[from] crate::pg::ConnectError),
    #[error("lease table holds {text:?} as a checkpoint: {source}")]
    BadCheckpoint {
        text: String,
        #[source]
        source: super::sequence::InvalidSequenceNumber,
    },
}

/// An owner id unique to this process: host, process id and a random part, so a restarted process
/// never mistakes its predecessor's leases for its own.
pub fn owner_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "sluice".into());
    let random: u32 = rand::random();
    format!("{host}:{}:{random:08x}", std::process::id())
}

/// One process's view of the lease table.
pub struct Leases {
    scope: Arc<LeaseScope>,
    owner: Arc<str>,
    duration_seconds: f64,
}

impl Leases {
    /// Leases held for `duration` after each renewal.
    pub fn new(scope: LeaseScope, owner: &str, duration: Duration) -> Leases {
        Leases {
            scope: Arc::new(scope),
            owner: Arc::from(owner),
            duration_seconds: duration.as_secs_f64(),
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn scope(&self) -> &Arc<LeaseScope> {
        &self.scope
    }

    fn table(&self) -> &TableName {
        &self.scope.table
    }

    /// Adds rows for shards the table does not know yet, with their parents; known rows are left
    /// alone. Returns how many were added.
    pub async fn register(
        &self,
        client: &Client,
        shards: &[ShardDescription],
    ) -> Result<u64, LeaseError> {
        let ids: Vec<&str> = shards.iter().map(|s| s.shard_id.as_str()).collect();
        let parents: Vec<String> = shards
            .iter()
            .map(|s| s.parents().collect::<Vec<_>>().join(","))
            .collect();
        let sql = format!(
            "INSERT INTO {t} (application, stream, shard_id, parent_shard_ids)
             SELECT $1, $2, s.shard_id, string_to_array(s.parents, ',')
             FROM unnest($3::text[], $4::text[]) AS s(shard_id, parents)
             ON CONFLICT (application, stream, shard_id) DO NOTHING",
            t = self.table()
        );
        Ok(client
            .execute(
                &sql,
                &[&self.scope.application, &self.scope.stream, &ids, &parents],
            )
            .await?)
    }

    /// Shards this application has read to their end.
    pub async fn finished_shards(&self, client: &Client) -> Result<HashSet<String>, LeaseError> {
        let sql = format!(
            "SELECT shard_id FROM {t} WHERE application = $1 AND stream = $2 AND finished",
            t = self.table()
        );
        let rows = client
            .query(&sql, &[&self.scope.application, &self.scope.stream])
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// One round of taking: free and expired leases among `eligible` (registered, readable shards)
    /// up to this process's share, or else at most one lease from the busiest holder. Returns what
    /// was taken; a lease another process took first is simply skipped.
    pub async fn acquire(
        &self,
        client: &Client,
        eligible: &[&str],
    ) -> Result<Vec<TakenLease>, LeaseError> {
        let views = self.views(client).await?;
        let eligible: HashSet<&str> = eligible.iter().copied().collect();
        let plan = balance::plan(&self.owner, &views, &eligible);
        let mut free = plan.free;
        // Processes starting together would otherwise all race for the same first rows.
        free.shuffle(&mut rand::rng());
        let mut taken = Vec::new();
        for view in free {
            if taken.len() >= plan.take {
                break;
            }
            if let Some(lease) = self.take_free(client, &view).await? {
                taken.push(lease);
            }
        }
        if let Some(view) = plan.steal
            && let Some(lease) = self.steal(client, &view).await?
        {
            taken.push(lease);
        }
        Ok(taken)
    }

    /// The lease rows of this application and stream, never another's.
    async fn select(
        &self,
        client: &Client,
        columns: &str,
        rest: &str,
    ) -> Result<Vec<tokio_postgres::Row>, LeaseError> {
        let sql = format!(
            "SELECT {columns} FROM {t} WHERE application = $1 AND stream = $2 {rest}",
            t = self.table()
        );
        Ok(client
            .query(&sql, &[&self.scope.application, &self.scope.stream])
            .await?)
    }

    async fn views(&self, client: &Client) -> Result<Vec<LeaseView>, LeaseError> {
        let rows = self
            .select(
                client,
                "shard_id, owner, epoch, coalesce(expires_at > now(), false)",
                "AND NOT finished",
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| LeaseView {
                shard_id: r.get(0),
                owner: r.get(1),
                epoch: r.get(2),
                live: r.get(3),
            })
            .collect())
    }

    /// What an acquisition returns: the new epoch, the checkpoint, and whether a parent was finished.
    fn returning(&self) -> String {
        format!(
            "RETURNING l.epoch, l.checkpoint::text,
                EXISTS (SELECT 1 FROM {t} p WHERE p.application = l.application
                        AND p.stream = l.stream AND p.shard_id = ANY(l.parent_shard_ids)
                        AND p.finished)",
            t = self.table()
        )
    }

    /// Takes a lease that is free or expired, if it still is (and nobody took it since it was read).
    async fn take_free(
        &self,
        client: &Client,
        view: &LeaseView,
    ) -> Result<Option<TakenLease>, LeaseError> {
        self.take_if(client, view, None).await
    }

    /// Takes a live lease from its holder, if the holder still has it at the epoch seen.
    async fn steal(
        &self,
        client: &Client,
        view: &LeaseView,
    ) -> Result<Option<TakenLease>, LeaseError> {
        let Some(holder) = &view.owner else {
            return self.take_free(client, view).await;
        };
        let taken = self.take_if(client, view, Some(holder)).await?;
        if let Some(lease) = &taken {
            tracing::info!(
                shard = %lease.claim.shard_id,
                from = %holder,
                epoch = lease.claim.epoch,
                "lease taken over to balance the shards"
            );
        }
        Ok(taken)
    }

    /// One conditional UPDATE for both ways of taking a lease: it succeeds only at the epoch seen,
    /// so two processes racing for a shard cannot both win. Without a `holder` the lease must be
    /// free or expired by the database's clock; with one, it must still be that holder's.
    async fn take_if(
        &self,
        client: &Client,
        view: &LeaseView,
        holder: Option<&String>,
    ) -> Result<Option<TakenLease>, LeaseError> {
        let held_by = match holder {
            None => "(l.owner IS NULL OR l.expires_at IS NULL OR l.expires_at <= now())",
            Some(_) => "l.owner = $7",
        };
        let sql = format!(
            "UPDATE {t} AS l SET owner = $4, epoch = l.epoch + 1,
                 expires_at = now() + make_interval(secs => $6), updated_at = now()
             WHERE l.application = $1 AND l.stream = $2 AND l.shard_id = $3 AND l.epoch = $5
               AND NOT l.finished AND {held_by}
             {returning}",
            t = self.table(),
            returning = self.returning()
        );
        let owner: &str = &self.owner;
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
            &self.scope.application,
            &self.scope.stream,
            &view.shard_id,
            &owner,
            &view.epoch,
            &self.duration_seconds,
        ];
        if let Some(holder) = holder {
            params.push(holder);
        }
        let row = client.query_opt(&sql, &params).await?;
        row.map(|r| self.taken(&view.shard_id, &r, holder.cloned()))
            .transpose()
    }

    fn taken(
        &self,
        shard_id: &str,
        row: &tokio_postgres::Row,
        taken_from: Option<String>,
    ) -> Result<TakenLease, LeaseError> {
        let checkpoint = row
            .get::<_, Option<String>>(1)
            .map(|text| {
                SequenceNumber::parse(&text)
                    .map_err(|source| LeaseError::BadCheckpoint { text, source })
            })
            .transpose()?;
        Ok(TakenLease {
            claim: LeaseClaim {
                scope: self.scope.clone(),
                shard_id: shard_id.to_owned(),
                owner: self.owner.clone(),
                epoch: row.get(0),
                duration: Duration::from_secs_f64(self.duration_seconds),
            },
            checkpoint,
            parent_read_to_end: row.get(2),
            taken_from,
        })
    }

    /// Extends the leases in `held` that this process still holds at their epoch; returns those.
    /// A claim missing from the answer was lost (taken over, or its shard finished) and its reader
    /// must stop: its next checkpoint would be fenced off anyway.
    pub async fn renew(
        &self,
        client: &Client,
        held: &[LeaseClaim],
    ) -> Result<Vec<LeaseClaim>, LeaseError> {
        let (shards, epochs) = self.keys(held);
        let sql = format!(
            "UPDATE {t} AS l SET expires_at = now() + make_interval(secs => $6), updated_at = now()
             FROM unnest($3::text[], $4::int8[]) AS h(shard_id, epoch)
             WHERE l.application = $1 AND l.stream = $2 AND l.shard_id = h.shard_id
               AND l.epoch = h.epoch AND l.owner = $5 AND NOT l.finished
             RETURNING l.shard_id",
            t = self.table()
        );
        let rows = client
            .query(
                &sql,
                &[
                    &self.scope.application,
                    &self.scope.stream,
                    &shards,
                    &epochs,
                    &&*self.owner,
                    &self.duration_seconds,
                ],
            )
            .await?;
        let renewed: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
        Ok(held
            .iter()
            .filter(|c| renewed.contains(&c.shard_id))
            .cloned()
            .collect())
    }

    /// Hands the leases in `held` back at once (graceful stop), so other processes need not wait
    /// for them to expire. The epoch moves on, fencing off any commit still on its way under them.
    /// Returns how many were released.
    pub async fn release(&self, client: &Client, held: &[LeaseClaim]) -> Result<u64, LeaseError> {
        let (shards, epochs) = self.keys(held);
        let sql = format!(
            "UPDATE {t} AS l SET owner = NULL, expires_at = NULL, epoch = l.epoch + 1,
                 updated_at = now()
             FROM unnest($3::text[], $4::int8[]) AS h(shard_id, epoch)
             WHERE l.application = $1 AND l.stream = $2 AND l.shard_id = h.shard_id
               AND l.epoch = h.epoch AND l.owner = $5",
            t = self.table()
        );
        Ok(client
            .execute(
                &sql,
                &[
                    &self.scope.application,
                    &self.scope.stream,
                    &shards,
                    &epochs,
                    &&*self.owner,
                ],
            )
            .await?)
    }

    fn keys<'a>(&self, held: &'a [LeaseClaim]) -> (Vec<&'a str>, Vec<i64>) {
        held.iter()
            .filter(|c| *c.scope == *self.scope)
            .map(|c| (c.shard_id.as_str(), c.epoch))
            .unzip()
    }

    /// Every row of this application and stream, for reporting.
    pub async fn rows(&self, client: &Client) -> Result<Vec<LeaseRow>, LeaseError> {
        let rows = self
            .select(
                client,
                "shard_id, parent_shard_ids, owner, epoch,
                 extract(epoch FROM expires_at - now())::float8, checkpoint::text, finished",
                "ORDER BY shard_id",
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| LeaseRow {
                shard_id: r.get(0),
                parent_shard_ids: r.get(1),
                owner: r.get(2),
                epoch: r.get(3),
                expires_in_seconds: r.get(4),
                checkpoint: r.get(5),
                finished: r.get(6),
            })
            .collect())
    }
}
