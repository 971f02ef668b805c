//! The SQLite store's connection pool: deadpool's pool over sqlx connections.
//!
//! Why not `sqlx::Pool`: it pings every connection as it is returned (a full round trip
//! to the database per request, on a spawned task) so that a connection left mid-call by
//! a cancelled future is never reused. Here a connection instead records whether its last
//! call finished; one that did not is dropped at its next checkout, and the database is
//! pinged only for a connection that sat idle long enough to have gone stale.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use deadpool::managed::{self, Metrics, PoolError, RecycleError, RecycleResult};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use sqlx::Connection;

use super::PoolStatus;

/// A histogram of connection waits (buckets 0.1 ms to about 3 s), exported as a metric.
pub fn wait_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// Opens one connection, set up as the store needs it.
pub type Connect<C> =
    Box<dyn Fn() -> Pin<Box<dyn Future<Output = Result<C, sqlx::Error>> + Send>> + Send + Sync>;

/// When connections are checked, retired and closed.
#[derive(Debug, Clone, Copy)]
pub struct Lifecycle {
    /// A connection idle longer than this is pinged before it is handed out.
    pub check_after_idle: Duration,
    /// A connection older than this is closed at its next checkout (picks up failovers
    /// and DNS changes); `None`: kept for good.
    pub max_lifetime: Option<Duration>,
    /// A connection unused this long is closed by the reaper; `None`: kept for good.
    pub idle_timeout: Option<Duration>,
    /// Whether a connection whose last call was cut short or failed is dropped.
    pub drop_interrupted: bool,
}

impl Lifecycle {
    /// For a database server: lifetime and idle timeout as `sqlx::Pool`'s defaults
    /// (30 min, 10 min).
    pub fn server(check_after_idle: Duration) -> Self {
        Self {
            check_after_idle,
            max_lifetime: Some(Duration::from_secs(30 * 60)),
            idle_timeout: Some(Duration::from_secs(10 * 60)),
            drop_interrupted: true,
        }
    }
}

/// A pooled connection and whether its last call ran to completion.
pub struct Tracked<C> {
    conn: C,
    interrupted: bool,
}

impl<C: Connection> Tracked<C> {
    /// Runs one database call on the connection. Only a call that returns `Ok` leaves it
    /// reusable: one cancelled mid-way (a deadline) or failed may have left unread
    /// replies or a broken socket behind.
    pub async fn run<T>(
        &mut self,
        call: impl AsyncFnOnce(&mut C) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        self.interrupted = true;
        let result = call(&mut self.conn).await;
        self.interrupted = result.is_err();
        result
    }
}

pub struct Manager<C> {
    connect: Connect<C>,
    lifecycle: Lifecycle,
}

impl<C: Connection> managed::Manager for Manager<C> {
    type Type = Tracked<C>;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<Tracked<C>, sqlx::Error> {
        Ok(Tracked {
            conn: (self.connect)().await?,
            interrupted: false,
        })
    }

    async fn recycle(&self, obj: &mut Tracked<C>, metrics: &Metrics) -> RecycleResult<sqlx::Error> {
        if obj.interrupted && self.lifecycle.drop_interrupted {
            return Err(RecycleError::message("its last call did not finish"));
        }
        if self
            .lifecycle
            .max_lifetime
            .is_some_and(|max| metrics.age() > max)
        {
            return Err(RecycleError::message("past its lifetime"));
        }
        if metrics.last_used() > self.lifecycle.check_after_idle {
            obj.conn.ping().await?;
        }
        Ok(())
    }
}

pub type Pooled<C> = managed::Object<Manager<C>>;

/// A bounded pool of `C` connections.
pub struct Pool<C: Connection> {
    inner: managed::Pool<Manager<C>>,
    acquire_wait: Histogram,
}

impl<C: Connection> Clone for Pool<C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            acquire_wait: self.acquire_wait.clone(),
        }
    }
}

impl<C: Connection + 'static> Pool<C> {
    /// A pool of up to `max_size` connections. A request waits at most `acquire_timeout`
    /// for a free one, and as long again to open a new one.
    pub fn new(
        connect: Connect<C>,
        max_size: usize,
        acquire_timeout: Duration,
        lifecycle: Lifecycle,
        acquire_wait: Histogram,
    ) -> Self {
        let inner = managed::Pool::builder(Manager { connect, lifecycle })
            .max_size(max_size)
            // The most recently used connection first: under light load the same few
            // stay warm (no idle check), and the rest go idle and are closed.
            .queue_mode(managed::QueueMode::Lifo)
            .runtime(deadpool::Runtime::Tokio1)
            .wait_timeout(Some(acquire_timeout))
            .create_timeout(Some(acquire_timeout))
            .recycle_timeout(Some(acquire_timeout))
            .build()
            // Only fails when a timeout is set without a runtime, and one is set above.
            .unwrap_or_else(|e| unreachable!("pool configuration: {e}"));
        if let Some(idle_timeout) = lifecycle.idle_timeout {
            tokio::spawn(reap_idle(inner.weak(), idle_timeout));
        }
        Self {
            inner,
            acquire_wait,
        }
    }

    /// A connection, the wait for it recorded in the pool-wait metric.
    pub async fn get(&self) -> Result<Pooled<C>, sqlx::Error> {
        let started = Instant::now();
        let conn = self.inner.get().await;
        self.acquire_wait.observe(started.elapsed().as_secs_f64());
        conn.map_err(|e| match e {
            PoolError::Backend(e) => e,
            PoolError::Timeout(_) => sqlx::Error::PoolTimedOut,
            _ => sqlx::Error::PoolClosed,
        })
    }

    pub fn status(&self) -> PoolStatus {
        let status = self.inner.status();
        PoolStatus {
            size: u32::try_from(status.size).unwrap_or(u32::MAX),
            idle: status.available,
        }
    }

    /// Whether both handles are the same pool.
    pub fn is_same(&self, other: &Self) -> bool {
        std::ptr::eq(self.inner.manager(), other.inner.manager())
    }

    pub fn acquire_wait(&self) -> &Histogram {
        &self.acquire_wait
    }

    /// Closes every connection; calls made afterwards fail with `PoolClosed`.
    pub fn close(&self) {
        self.inner.close();
    }
}

/// Closes connections left unused for `idle_timeout`, until the pool is gone.
async fn reap_idle<C: Connection + 'static>(
    pool: managed::WeakPool<Manager<C>>,
    idle_timeout: Duration,
) {
    let mut tick = tokio::time::interval(idle_timeout / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        pool.retain(|_, metrics| metrics.last_used() < idle_timeout);
    }
}
