//! Event stream benchmark client (run by `scripts/bench-events`): opens many event
//! streams, measures the server's memory and CPU while they sit idle, then the fan-out
//! latency — from a write's commit (its `updated_at`) to the event's arrival — while
//! tasks are patched at a steady rate, with streams on one or two instances.
//!
//! A plain HTTP/1.1 client over raw sockets, so that 10,000 streams cost the client little
//! and every byte the server sends is seen as it arrives.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use task_api::config::AuthConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

struct Args {
    a: String,
    b: Option<String>,
    pid_a: u32,
    pid_b: Option<u32>,
    secret: String,
    streams: usize,
    users: usize,
    rate: u64,
    seconds: u64,
    idle: u64,
}

fn args() -> Args {
    let mut raw = std::env::args().skip(1);
    let mut a = Args {
        a: String::new(),
        b: None,
        pid_a: 0,
        pid_b: None,
        secret: String::new(),
        streams: 10_000,
        users: 100,
        rate: 200,
        seconds: 10,
        idle: 10,
    };
    while let (Some(k), Some(v)) = (raw.next(), raw.next()) {
        match k.as_str() {
            "--a" => a.a = v,
            "--b" => a.b = Some(v),
            "--pid-a" => a.pid_a = v.parse().unwrap(),
            "--pid-b" => a.pid_b = Some(v.parse().unwrap()),
            "--secret" => a.secret = v,
            "--streams" => a.streams = v.parse().unwrap(),
            "--users" => a.users = v.parse().unwrap(),
            "--rate" => a.rate = v.parse().unwrap(),
            "--seconds" => a.seconds = v.parse().unwrap(),
            "--idle" => a.idle = v.parse().unwrap(),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// Resident and peak memory (KiB) and CPU ticks (user + system) of a process.
fn process(pid: u32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = rest
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + rest
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    (kib("VmRSS:"), kib("VmHWM:"), ticks)
}

struct Stats {
    ready: AtomicUsize,
    ended: AtomicUsize,
    latencies_ms: Mutex<Vec<f64>>,
    /// (write number, when its event arrived)
    arrivals: Mutex<Vec<(u64, chrono::DateTime<chrono::Utc>)>>,
    events: AtomicUsize,
}

impl Stats {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            ready: AtomicUsize::new(0),
            ended: AtomicUsize::new(0),
            latencies_ms: Mutex::new(Vec::new()),
            arrivals: Mutex::new(Vec::new()),
            events: AtomicUsize::new(0),
        })
    }
}

fn token(secret: &str, user: &str) -> String {
    let auth = AuthConfig {
        secret: Some(SecretString::from(secret.to_owned())),
        better_auth_url: None,
        jwks_url: None,
        issuer: None,
        audience: Vec::new(),
    };
    task_api::auth::mint(
        auth.secret.as_ref().unwrap(),
        &auth,
        user,
        Duration::from_secs(3600),
    )
    .unwrap()
}

/// One stream: open it, then count change events and their latency until `stop`.
async fn follow(
    base: String,
    user: String,
    token: String,
    stats: Arc<Stats>,
    stop: CancellationToken,
    opened: tokio::sync::oneshot::Sender<()>,
) {
    let mut opened = Some(opened);
    let address = base.trim_start_matches("http://").to_owned();
    let Ok(mut socket) = TcpStream::connect(&address).await else {
        stats.ended.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let request = format!(
        "GET /api/{user}/events HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    );
    if socket.write_all(request.as_bytes()).await.is_err() {
        stats.ended.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 4096];
    let mut ready = false;
    loop {
        let n = tokio::select! {
            n = socket.read(&mut chunk) => n,
            () = stop.cancelled() => return,
        };
        let n = match n {
            Ok(0) | Err(_) => {
                if !stop.is_cancelled() {
                    stats.ended.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            Ok(n) => n,
        };
        let received = chrono::Utc::now();
        buffer.extend_from_slice(&chunk[..n]);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&block);
            if !ready && text.contains("event: ready") {
                ready = true;
                stats.ready.fetch_add(1, Ordering::Relaxed);
                if let Some(opened) = opened.take() {
                    let _ = opened.send(());
                }
            } else if text.contains("event: change") {
                let Some(data) = text.lines().find_map(|l| l.strip_prefix("data: ")) else {
                    continue;
                };
                let Ok(change) = serde_json::from_str::<serde_json::Value>(data) else {
                    continue;
                };
                if let Some(at) = change["task"]["updated_at"].as_str() {
                    let at = chrono::DateTime::parse_from_rfc3339(at).unwrap().to_utc();
                    let ms = (received - at).num_microseconds().unwrap_or(0) as f64 / 1000.0;
                    stats.latencies_ms.lock().unwrap().push(ms);
                }
                if let Some(n) = change["task"]["title"]
                    .as_str()
                    .and_then(|t| t.strip_prefix('n'))
                    .and_then(|n| n.parse().ok())
                {
                    stats.arrivals.lock().unwrap().push((n, received));
                }
                stats.events.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Opens `count` streams on `base` for users `0..users` (round robin), 200 at a time.
async fn open_streams(
    base: &str,
    count: usize,
    users: usize,
    secret: &str,
    stats: &Arc<Stats>,
    stop: &CancellationToken,
) {
    let tokens: Vec<String> = (0..users)
        .map(|u| token(secret, &format!("ev{u}")))
        .collect();
    let gate = Arc::new(Semaphore::new(100));
    for i in 0..count {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let (base, stats, stop) = (base.to_owned(), stats.clone(), stop.clone());
        let (user, token) = (format!("ev{}", i % users), tokens[i % users].clone());
        let (opened, ready) = tokio::sync::oneshot::channel();
        tokio::spawn(follow(base, user, token, stats, stop, opened));
        // At most 100 connections opening at once (the listen backlog is finite).
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), ready).await;
            drop(permit);
        });
    }
    let until = Instant::now() + Duration::from_secs(120);
    while stats.ready.load(Ordering::Relaxed) + stats.ended.load(Ordering::Relaxed) < count
        && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// When a write's response arrived, and how long the write took (ms).
type Ack = (chrono::DateTime<chrono::Utc>, f64);

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let args = args();
    let client = reqwest::Client::new();
    // One task per user, to patch.
    let mut tasks = Vec::new();
    for u in 0..args.users {
        let user = format!("ev{u}");
        let created: serde_json::Value = client
            .post(format!("{}/api/{user}/tasks", args.a))
            .bearer_auth(token(&args.secret, &user))
            .header("content-type", "application/json")
            .body(r#"{"title": "bench"}"#)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .map(|b| serde_json::from_slice(&b).unwrap())
            .unwrap();
        tasks.push((user, created["id"].as_i64().unwrap()));
    }

    // Phase 1: every stream on instance A, idle.
    let stats = Stats::new();
    let stop = CancellationToken::new();
    let (rss0, _, _) = process(args.pid_a);
    let opening = Instant::now();
    open_streams(
        &args.a,
        args.streams,
        args.users,
        &args.secret,
        &stats,
        &stop,
    )
    .await;
    let opened = stats.ready.load(Ordering::Relaxed);
    println!(
        "opened {opened} of {} streams on A in {:.1} s ({} refused or closed)",
        args.streams,
        opening.elapsed().as_secs_f64(),
        stats.ended.load(Ordering::Relaxed)
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, _, ticks0) = process(args.pid_a);
    tokio::time::sleep(Duration::from_secs(args.idle)).await;
    let (rss, hwm, ticks1) = process(args.pid_a);
    let cpu = (ticks1 - ticks0) as f64 / 100.0 / args.idle as f64 * 100.0;
    println!(
        "| idle, {opened} streams on one instance | RSS {:.1} MiB (before the streams: {:.1} MiB, peak {:.1} MiB) | CPU {cpu:.1} % of one core |",
        rss as f64 / 1024.0,
        rss0 as f64 / 1024.0,
        hwm as f64 / 1024.0
    );

    // Phase 2: the streams split across the two instances (if there are two); writes
    // through A at a steady rate.
    let (stats_a, stats_b) = match &args.b {
        Some(b) => {
            stop.cancel();
            tokio::time::sleep(Duration::from_millis(500)).await;
            let stop = CancellationToken::new();
            let (sa, sb) = (Stats::new(), Stats::new());
            open_streams(
                &args.a,
                args.streams / 2,
                args.users,
                &args.secret,
                &sa,
                &stop,
            )
            .await;
            open_streams(b, args.streams / 2, args.users, &args.secret, &sb, &stop).await;
            (sa, Some(sb))
        }
        None => (stats.clone(), None),
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    stats_a.latencies_ms.lock().unwrap().clear();
    stats_a.arrivals.lock().unwrap().clear();
    stats_a.events.store(0, Ordering::Relaxed);
    let writes = args.rate * args.seconds;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    let started = Instant::now();
    let tokens: Vec<String> = tasks.iter().map(|(u, _)| token(&args.secret, u)).collect();
    let failed = Arc::new(AtomicUsize::new(0));
    // When each write's response arrived (its commit is done by then), and how long it took.
    let acks: Arc<Mutex<Vec<Option<Ack>>>> = Arc::new(Mutex::new(vec![None; writes as usize]));
    for n in 0..writes {
        tick.tick().await;
        let i = (n as usize * 7919) % tasks.len();
        let (user, id) = &tasks[i];
        let request = client
            .patch(format!("{}/api/{user}/tasks/{id}", args.a))
            .bearer_auth(&tokens[i])
            .header("content-type", "application/json")
            .body(format!(r#"{{"title": "n{n}"}}"#));
        let (failed, acks) = (failed.clone(), acks.clone());
        tokio::spawn(async move {
            let sent = Instant::now();
            if request.send().await.is_ok_and(|r| r.status().is_success()) {
                let took = sent.elapsed().as_secs_f64() * 1000.0;
                acks.lock().unwrap()[n as usize] = Some((chrono::Utc::now(), took));
            } else {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let rate = writes as f64 / started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per_user = args.streams / args.users;
    for (name, stats, streams) in [
        (
            "A (the writes' instance)",
            Some(&stats_a),
            if args.b.is_some() {
                args.streams / 2
            } else {
                args.streams
            },
        ),
        ("B (through NOTIFY)", stats_b.as_ref(), args.streams / 2),
    ] {
        let Some(stats) = stats else { continue };
        let mut l = stats.latencies_ms.lock().unwrap().clone();
        l.sort_by(f64::total_cmp);
        let expected = writes as usize * streams / args.users.max(1);
        let acks = acks.lock().unwrap();
        let mut after_ack: Vec<f64> = stats
            .arrivals
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(n, at)| {
                let (ack, _) = (*acks.get(*n as usize)?)?;
                Some(((*at - ack).num_microseconds()? as f64 / 1000.0).max(0.0))
            })
            .collect();
        after_ack.sort_by(f64::total_cmp);
        println!(
            "|   the same events, from the write's response (its commit done): p50 {:.1} ms, p99 {:.1} ms |",
            percentile(&after_ack, 0.5),
            percentile(&after_ack, 0.99)
        );
        println!(
            "| {rate:.0} writes/s, streams on {name}: {streams} | p50 {:.1} ms | p99 {:.1} ms | max {:.1} ms | {} of {expected} events | {} streams dropped |",
            percentile(&l, 0.5),
            percentile(&l, 0.99),
            l.last().copied().unwrap_or(f64::NAN),
            stats.events.load(Ordering::Relaxed),
            stats.ended.load(Ordering::Relaxed),
        );
    }
    let _ = per_user;
    let mut write_ms: Vec<f64> = acks
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .map(|(_, t)| *t)
        .collect();
    write_ms.sort_by(f64::total_cmp);
    println!(
        "| the writes themselves (PATCH, request to response) | p50 {:.1} ms | p99 {:.1} ms |",
        percentile(&write_ms, 0.5),
        percentile(&write_ms, 0.99)
    );
    if let Some(pid) = args.pid_b {
        let (rss, hwm, _) = process(pid);
        println!(
            "B: RSS {:.1} MiB, peak {:.1} MiB",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
    }
    println!("failed writes: {}", failed.load(Ordering::Relaxed));
    stop.cancel();
}
