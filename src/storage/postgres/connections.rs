//! The connections PostgreSQL requests run on: a few tokio-postgres clients, each shared
//! by every request that reaches it.
//!
//! Why not a pool that lends a connection to one request at a time (sqlx's, deadpool's):
//! a tokio-postgres client sends each caller's statement as soon as it is called and
//! matches the replies in order, so concurrent requests' statements travel together
//! (pipelined) and the server answers them without waiting on a round trip in between.
//! Every request-path call is one statement, its own transaction, so nothing is lost by
//! sharing. Measured on one 2-core machine, the same get statement from 32 concurrent
//! callers: 34,000 per second through sqlx's pool of 32 connections, 57,000 from
//! `pgbench -M prepared`, 129,000 through 4 shared clients.
//!
//! Each client keeps its statements prepared (parsed and planned once). Behind a
//! transaction pooler ([`Pooler::Transaction`]) nothing may stay on a server connection:
//! there a client is lent to one call at a time, which runs in a transaction of its own
//! with unnamed statements.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::Semaphore;
use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres::{Client, Row, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::storage::sql::{Arg, Stmt};
use crate::storage::{PoolStatus, StoreError};

/// How many calls share one client before the next client takes calls too. 32 rather
/// than 16: 32 concurrent lists on one client ran at p99 5 ms against 7–58 ms over two
/// clients of 16 (2 cores: each extra busy server process is one more for the scheduler
/// to preempt, and a preempted process stalls every call queued on its client).
pub const PIPELINE_DEPTH: usize = 32;

/// How many writes one client carries at once; further writes wait their turn. Two rather
/// than one: the server process then finds the next write waiting when it has committed
/// one, instead of idling for a round trip. (32 concurrent creates on 2 cores, median of
/// 10 runs interleaved: 6,586 per second at two, 5,570 at one.)
pub const WRITES_PER_CONNECTION: usize = 2;

/// How the clients are shared.
#[derive(Debug, Clone)]
pub enum Sharing {
    /// Every call that reaches a client shares it (PostgreSQL itself, or a session
    /// pooler). `setup` runs once on each new connection.
    Pipelined { setup: String },
    /// One call at a time per client, each in a transaction that `begin` opens (a
    /// transaction pooler).
    Exclusive { begin: String },
}

/// When clients are checked and retired.
#[derive(Debug, Clone, Copy)]
pub struct Upkeep {
    /// How long a call waits for a client (only lent ones can all be busy) and for a
    /// new connection.
    pub acquire_timeout: Duration,
    /// A client unused longer than this is pinged before it is used.
    pub check_after_idle: Duration,
    /// A client older than this is replaced at its next use (picks up failovers and DNS
    /// changes); calls already on it finish there.
    pub max_lifetime: Duration,
}

/// Up to `size` clients, opened as calls need them.
pub struct Connections {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    sharing: Sharing,
    upkeep: Upkeep,
    slots: Box<[Slot]>,
    /// Lent clients: one permit per slot.
    permits: Semaphore,
    /// Shared clients: [`WRITES_PER_CONNECTION`] permits per slot for writes (see
    /// [`Connections::lease`]).
    write_permits: Semaphore,
    wait: Histogram,
    closed: AtomicBool,
    epoch: Instant,
}

#[derive(Default)]
struct Slot {
    conn: Mutex<Option<Arc<Conn>>>,
    /// Calls on this slot now.
    users: AtomicUsize,
    /// Writes on this slot now (shared clients: up to [`WRITES_PER_CONNECTION`]).
    writes: AtomicUsize,
    /// Held while the slot's connection is opened, so that it is opened once.
    opening: tokio::sync::Mutex<()>,
}

struct Conn {
    client: Client,
    /// Prepared statements, by [`Stmt::key`].
    prepared: Mutex<HashMap<usize, Statement>>,
    opened: Instant,
    /// Milliseconds after the pool's epoch.
    last_used: AtomicU64,
}

/// One call's use of a client.
pub struct Lease<'a> {
    pool: &'a Connections,
    conn: Arc<Conn>,
    /// Whether the call ran to its end (a lent client whose call was cut short may sit
    /// inside a transaction: it is not lent again).
    finished: bool,
    /// Dropped after `drop` has run (fields drop in order after it), and before the
    /// permit, so that a call let in by a permit finds the room it stands for.
    claim: Claim<'a>,
    _permit: Option<tokio::sync::SemaphorePermit<'a>>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if !self.finished && matches!(self.pool.sharing, Sharing::Exclusive { .. }) {
            let mut conn = self
                .claim
                .slot
                .conn
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, &self.conn)) {
                *conn = None;
            }
        }
    }
}

/// A call counted in its slot (and in its writes, for a write) until dropped: also when
/// the call is given up while its connection is still being opened.
struct Claim<'a> {
    slot: &'a Slot,
    index: usize,
    write: bool,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.write {
            self.slot.writes.fetch_sub(1, Ordering::Release);
        }
        self.slot.users.fetch_sub(1, Ordering::Release);
    }
}

impl Connections {
    pub fn new(
        config: tokio_postgres::Config,
        tls: MakeRustlsConnect,
        sharing: Sharing,
        size: usize,
        upkeep: Upkeep,
        wait: Histogram,
    ) -> Self {
        let size = size.max(1);
        Self {
            config,
            tls,
            sharing,
            upkeep,
            slots: (0..size).map(|_| Slot::default()).collect(),
            permits: Semaphore::new(size),
            write_permits: Semaphore::new(size * WRITES_PER_CONNECTION),
            wait,
            closed: AtomicBool::new(false),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A client for one call (`writes`: the call writes), the wait for it recorded in
    /// the pool-wait metric.
    pub async fn get(&self, writes: bool) -> Result<Lease<'_>, StoreError> {
        let started = Instant::now();
        let lease = tokio::time::timeout(self.upkeep.acquire_timeout, self.lease(writes)).await;
        self.wait.observe(started.elapsed().as_secs_f64());
        let mut lease =
            lease.map_err(|_| StoreError::database("no database connection in time"))??;
        let now = self.now_ms();
        let idle = now.saturating_sub(lease.conn.last_used.swap(now, Ordering::Relaxed));
        if Duration::from_millis(idle) > self.upkeep.check_after_idle
            && Box::pin(lease.conn.client.simple_query("")).await.is_err()
        {
            // Closed behind our back (the server restarted, a proxy timed it out): the
            // call gets a new one.
            self.discard(lease.claim.index, &lease.conn);
            lease.conn = Box::pin(self.connection(lease.claim.index)).await?;
        }
        Ok(lease)
    }

    async fn lease(&self, writes: bool) -> Result<Lease<'_>, StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::database("the pool is closed"));
        }
        let (slot, permit, write) = match self.sharing {
            // A read takes the first client carrying fewer than `PIPELINE_DEPTH` calls,
            // else the least busy: the fewer clients carry the load, the more statements
            // each server process finds waiting when it reads, and the fewer times it
            // sleeps and wakes. (On 2 cores, 32 concurrent gets: 33,000 per second over 2
            // clients, 24,000 spread over 10.)
            Sharing::Pipelined { .. } if !writes => {
                let users = |i: usize| self.slots[i].users.load(Ordering::Acquire);
                let slot = (0..self.slots.len())
                    .find(|&i| users(i) < PIPELINE_DEPTH)
                    .or_else(|| (0..self.slots.len()).min_by_key(|&i| users(i)))
                    .unwrap_or(0);
                self.slots[slot].users.fetch_add(1, Ordering::AcqRel);
                (slot, None, false)
            }
            // A write takes the client carrying the fewest writes, the ones the reads fill
            // last first, and waits its turn (first come, first served) while every
            // client carries `WRITES_PER_CONNECTION`. A server process commits its
            // statements one after another, each waiting for its WAL flush and for any
            // row lock another commit holds, so whatever queues behind a write on its
            // connection waits for all of that: a read behind it, or a third write where
            // one queue for all connections would hand it to the first that is free.
            // (On 2 cores, medians of 10 interleaved runs, 32 connections: mixed p99 8.4
            // ms against 10.2 ms with each write on the least busy client, at 8 % more
            // requests per second; create and patch within the runs' noise.)
            Sharing::Pipelined { .. } => {
                let permit = turn(&self.write_permits).await?;
                let slot = self
                    .claim(
                        |slot| &slot.writes,
                        WRITES_PER_CONNECTION,
                        (0..self.slots.len()).rev(),
                    )
                    .await;
                self.slots[slot].users.fetch_add(1, Ordering::AcqRel);
                (slot, Some(permit), true)
            }
            Sharing::Exclusive { .. } => {
                let permit = turn(&self.permits).await?;
                let slot = self.claim(|slot| &slot.users, 1, 0..self.slots.len()).await;
                (slot, Some(permit), false)
            }
        };
        let claim = Claim {
            slot: &self.slots[slot],
            index: slot,
            write,
        };
        let conn = self.connection(slot).await?;
        Ok(Lease {
            pool: self,
            conn,
            finished: false,
            claim,
            _permit: permit,
        })
    }

    /// A slot whose `count` was below `limit`, now counted one more: the least counted
    /// first, in the order of `slots`. Only a holder of a permit calls it, and there are
    /// no more permits than room (`limit` per slot), each given back only after its slot
    /// is: a slot with room exists whenever it is called. A pass can still miss it (a
    /// slot checked full can empty, and one not yet checked fill, while it runs), so it
    /// runs until it finds one.
    async fn claim(
        &self,
        count: impl Fn(&Slot) -> &AtomicUsize,
        limit: usize,
        slots: impl Iterator<Item = usize> + Clone,
    ) -> usize {
        loop {
            for level in 0..limit {
                let free = slots.clone().find(|&i| {
                    count(&self.slots[i])
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                            (n <= level).then_some(n + 1)
                        })
                        .is_ok()
                });
                if let Some(slot) = free {
                    return slot;
                }
            }
            tokio::task::yield_now().await;
        }
    }

    /// The slot's client, opened (or replaced) if it has none that is open and young.
    async fn connection(&self, slot: usize) -> Result<Arc<Conn>, StoreError> {
        let usable = |conn: &Option<Arc<Conn>>| {
            conn.as_ref()
                .filter(|c| !c.client.is_closed() && c.opened.elapsed() < self.upkeep.max_lifetime)
                .cloned()
        };
        let slot = &self.slots[slot];
        if let Some(conn) = usable(&slot.conn.lock().unwrap_or_else(PoisonError::into_inner)) {
            return Ok(conn);
        }
        let _opening = slot.opening.lock().await;
        if let Some(conn) = usable(&slot.conn.lock().unwrap_or_else(PoisonError::into_inner)) {
            return Ok(conn);
        }
        // Boxed: opening a connection (TLS handshake, start-up) is a large future, and
        // inline it would make every checkout's future as large, to be copied on each
        // call though it is rarely opened.
        let conn = Arc::new(Box::pin(self.open()).await?);
        *slot.conn.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
        Ok(conn)
    }

    async fn open(&self) -> Result<Conn, StoreError> {
        let (client, connection) = self.config.connect(self.tls.clone()).await?;
        // The connection's socket is driven by a task of its own; it ends when the
        // client is dropped or the server goes away.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "database connection ended");
            }
        });
        if let Sharing::Pipelined { setup } = &self.sharing {
            client.batch_execute(setup).await?;
        }
        Ok(Conn {
            client,
            prepared: Mutex::default(),
            opened: Instant::now(),
            last_used: AtomicU64::new(self.now_ms()),
        })
    }

    fn discard(&self, slot: usize, conn: &Arc<Conn>) {
        let mut current = self.slots[slot]
            .conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *current = None;
        }
    }

    pub fn status(&self) -> PoolStatus {
        let (mut size, mut idle) = (0, 0);
        for slot in &self.slots {
            let open = slot
                .conn
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .is_some_and(|c| !c.client.is_closed());
            if open {
                size += 1;
                if slot.users.load(Ordering::Acquire) == 0 {
                    idle += 1;
                }
            }
        }
        PoolStatus { size, idle }
    }

    pub fn acquire_wait(&self) -> &Histogram {
        &self.wait
    }

    /// Closes every client; calls made afterwards fail (calls under way finish).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.permits.close();
        self.write_permits.close();
        for slot in &self.slots {
            slot.conn
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
        }
    }
}

impl Lease<'_> {
    /// The client itself, for what the store's statements do not cover (tools, tests).
    pub fn client(&self) -> &Client {
        &self.conn.client
    }

    /// Runs `stmt`; its rows.
    pub async fn fetch(
        &mut self,
        stmt: &'static Stmt,
        args: &[Arg<'_>],
    ) -> Result<Vec<Row>, StoreError> {
        let rows = match &self.pool.sharing {
            Sharing::Pipelined { .. } => {
                let statement = self.prepared(stmt).await?;
                self.conn.client.query(&statement, &params(args)).await?
            }
            Sharing::Exclusive { begin } => self.in_transaction(begin, &stmt.sql, args).await?.0,
        };
        self.finished = true;
        Ok(rows)
    }

    /// Runs `stmt`; how many rows it changed.
    pub async fn execute(
        &mut self,
        stmt: &'static Stmt,
        args: &[Arg<'_>],
    ) -> Result<u64, StoreError> {
        let done = match &self.pool.sharing {
            Sharing::Pipelined { .. } => {
                let statement = self.prepared(stmt).await?;
                self.conn.client.execute(&statement, &params(args)).await?
            }
            Sharing::Exclusive { begin } => self.in_transaction(begin, &stmt.sql, args).await?.1,
        };
        self.finished = true;
        Ok(done)
    }

    /// Runs one statement without parameters as the store runs its own (tools, tests).
    pub async fn fetch_sql(&mut self, sql: &str) -> Result<Vec<Row>, StoreError> {
        let rows = match &self.pool.sharing {
            Sharing::Pipelined { .. } => self.conn.client.query(sql, &[]).await?,
            Sharing::Exclusive { begin } => self.in_transaction(begin, sql, &[]).await?.0,
        };
        self.finished = true;
        Ok(rows)
    }

    /// `sql` as an unnamed statement in a transaction that `begin` opens: committed if it
    /// succeeds, else rolled back. Its rows and how many it changed.
    async fn in_transaction(
        &self,
        begin: &str,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<(Vec<Row>, u64), StoreError> {
        let client = &self.conn.client;
        client.batch_execute(begin).await?;
        let ran = async {
            let stream = client.query_typed_raw(sql, typed(args)).await?;
            let mut stream = std::pin::pin!(stream);
            let mut rows = Vec::new();
            while let Some(row) = futures_util::StreamExt::next(&mut stream).await {
                rows.push(row?);
            }
            Ok::<_, tokio_postgres::Error>((rows, stream.rows_affected().unwrap_or(0)))
        }
        .await;
        match ran {
            Ok(done) => {
                client.batch_execute("COMMIT").await?;
                Ok(done)
            }
            Err(e) => {
                // The server connection goes back to the pooler at once; the error is the
                // statement's, whatever the rollback gives.
                let _ = client.batch_execute("ROLLBACK").await;
                Err(e.into())
            }
        }
    }

    /// `stmt` prepared on this client (prepared now if it is its first use here).
    async fn prepared(&self, stmt: &'static Stmt) -> Result<Statement, StoreError> {
        let cached = self
            .conn
            .prepared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&stmt.key())
            .cloned();
        if let Some(statement) = cached {
            return Ok(statement);
        }
        let statement = self.conn.client.prepare(&stmt.sql).await?;
        self.conn
            .prepared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(stmt.key(), statement.clone());
        Ok(statement)
    }
}

/// A permit of `permits`, waited for in turn (first come, first served).
async fn turn(permits: &Semaphore) -> Result<tokio::sync::SemaphorePermit<'_>, StoreError> {
    permits
        .acquire()
        .await
        .map_err(|_| StoreError::database("the pool is closed"))
}

/// The arguments as tokio-postgres takes them.
fn params<'a>(args: &'a [Arg<'a>]) -> Vec<&'a (dyn ToSql + Sync)> {
    args.iter().map(|arg| arg as &(dyn ToSql + Sync)).collect()
}

/// The arguments with their types, for an unnamed statement (the server infers none).
fn typed<'a>(args: &'a [Arg<'a>]) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    args.iter()
        .map(|arg| {
            let ty = match arg {
                Arg::Text(_) | Arg::OptText(_) => Type::TEXT,
                Arg::Int(_) => Type::INT8,
                Arg::Bool(_) | Arg::OptBool(_) => Type::BOOL,
                Arg::Instant(_) => Type::TIMESTAMPTZ,
                Arg::Versions(_) => Type::INT8_ARRAY,
                Arg::Bytes(_) => Type::BYTEA,
            };
            (arg as &(dyn ToSql + Sync), ty)
        })
        .collect()
}

impl ToSql for Arg<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match *self {
            Arg::Text(text) => text.to_sql(ty, out),
            Arg::OptText(text) => text.to_sql(ty, out),
            Arg::Int(n) => n.to_sql(ty, out),
            Arg::Bool(b) => b.to_sql(ty, out),
            Arg::OptBool(b) => b.to_sql(ty, out),
            Arg::Instant(at) => at.to_sql(ty, out),
            Arg::Versions(versions) => versions.to_sql(ty, out),
            Arg::Bytes(bytes) => bytes.to_sql(ty, out),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    /// Each value's own type check: a parameter of another type is an error, never a
    /// wrong encoding.
    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match *self {
            Arg::Text(text) => text.to_sql_checked(ty, out),
            Arg::OptText(text) => text.to_sql_checked(ty, out),
            Arg::Int(n) => n.to_sql_checked(ty, out),
            Arg::Bool(b) => b.to_sql_checked(ty, out),
            Arg::OptBool(b) => b.to_sql_checked(ty, out),
            Arg::Instant(at) => at.to_sql_checked(ty, out),
            Arg::Versions(versions) => versions.to_sql_checked(ty, out),
            Arg::Bytes(bytes) => bytes.to_sql_checked(ty, out),
        }
    }
}
