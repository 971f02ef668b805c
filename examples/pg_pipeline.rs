use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const Q: &str = "SELECT id, user_id, title, description, complete, created_at, updated_at, version FROM tasks WHERE id = $1";

fn main() {
    let mode = std::env::args().nth(1).unwrap();
    let n: usize = std::env::args().nth(2).map(|s| s.parse().unwrap()).unwrap_or(4);
    let url = std::env::var("URL").unwrap_or("postgres://root@127.0.0.1:5432/task_api_bench".into());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let count = Arc::new(AtomicU64::new(0));
        let stop = Instant::now() + Duration::from_secs(5);
        let mut handles = vec![];
        if mode == "sqlx" {
            let pool = sqlx::postgres::PgPoolOptions::new().max_connections(32).connect(&format!("{url}?sslmode=disable")).await.unwrap();
            for t in 0..32u64 {
                let pool = pool.clone(); let count = count.clone();
                handles.push(tokio::spawn(async move {
                    let mut i = t;
                    while Instant::now() < stop {
                        i = (i * 7 + 13) % 2000 + 1;
                        let row: Option<(i64, String, String, Option<String>, bool, chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>, i64)> = sqlx::query_as(Q).bind(i as i64).fetch_optional(&pool).await.unwrap();
                        std::hint::black_box(row);
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
        } else {
            let mut clients = vec![];
            for _ in 0..n {
                let (client, conn) = tokio_postgres::connect(&format!("{url}?sslmode=disable"), tokio_postgres::NoTls).await.unwrap();
                tokio::spawn(conn);
                let st = client.prepare(Q).await.unwrap();
                clients.push(Arc::new((client, st)));
            }
            for t in 0..32u64 {
                let c = clients[t as usize % n].clone(); let count = count.clone(); let typed = mode == "tt";
                handles.push(tokio::spawn(async move {
                    let mut i = t;
                    while Instant::now() < stop {
                        i = (i * 7 + 13) % 2000 + 1;
                        let row = if typed { c.0.query_typed(Q, &[(&(i as i64), tokio_postgres::types::Type::INT8)]).await.unwrap().into_iter().next() } else { c.0.query_opt(&c.1, &[&(i as i64)]).await.unwrap() };
                        if let Some(r) = row {
                            let v: (i64, String, String, Option<String>, bool, chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>, i64) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6), r.get(7));
                            std::hint::black_box(v);
                        }
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
        }
        for h in handles { h.await.unwrap(); }
        println!("{mode} {n}: {} q/s", count.load(Ordering::Relaxed) / 5);
    });
}
