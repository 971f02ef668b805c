//! The same get statement from 32 concurrent callers for 5 s, three ways: through sqlx's
//! pool of 32 connections (each lent to one caller at a time), and through N shared
//! tokio-postgres clients with the statement prepared (pipelined) or sent unnamed with
//! its types (as behind a transaction pooler). The figures behind the store's choice of
//! connections (`src/storage/postgres/connections.rs`); `pgbench -M prepared` on
//! `bench/pgbench/get.sql` is the reference.
//!
//! ```sh
//! BENCH_DATABASE_URL=postgres://root@127.0.0.1:5432/task_api_bench scripts/bench  # seeds
//! cargo run --release --example pg_clients -- sqlx
//! cargo run --release --example pg_clients -- shared 4
//! cargo run --release --example pg_clients -- unnamed 4
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::types::Type;

const GET: &str = "SELECT id, user_id, title, description, complete, created_at, updated_at, version FROM tasks WHERE id = $1";
const CALLERS: u64 = 32;
const SECONDS: u64 = 5;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "shared".into());
    let clients: usize = std::env::args().nth(2).map_or(Ok(4), |n| n.parse())?;
    let url = std::env::var("URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/task_api_bench".into());
    let url = format!("{url}?sslmode=disable");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(&mode, clients, &url))
}

async fn run(mode: &str, clients: usize, url: &str) -> Result<(), Box<dyn std::error::Error>> {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(SECONDS);
    let mut callers = tokio::task::JoinSet::new();
    if mode == "sqlx" {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(CALLERS as u32)
            .connect(url)
            .await?;
        for caller in 0..CALLERS {
            let (pool, done) = (pool.clone(), done.clone());
            callers.spawn(async move {
                let mut id = caller;
                while Instant::now() < stop {
                    id = (id * 7 + 13) % 2000 + 1;
                    let row = sqlx::query(GET).bind(id as i64).fetch_optional(&pool).await;
                    assert!(row.is_ok());
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    } else {
        let unnamed = mode == "unnamed";
        let mut shared = Vec::new();
        for _ in 0..clients.max(1) {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            let statement = client.prepare(GET).await?;
            shared.push(Arc::new((client, statement)));
        }
        for caller in 0..CALLERS {
            let (client, done) = (shared[caller as usize % shared.len()].clone(), done.clone());
            callers.spawn(async move {
                let mut id = caller;
                while Instant::now() < stop {
                    id = (id * 7 + 13) % 2000 + 1;
                    let id = id as i64;
                    let rows = if unnamed {
                        client.0.query_typed(GET, &[(&id, Type::INT8)]).await
                    } else {
                        client.0.query(&client.1, &[&id]).await
                    };
                    assert!(rows.is_ok());
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }
    callers.join_all().await;
    let rate = done.load(Ordering::Relaxed) / SECONDS;
    println!("{mode} ({clients} clients): {rate} statements/s");
    Ok(())
}
