//! Three instances of the binary behind a real HAProxy, on one PostgreSQL and one Redis,
//! under a mixed load of many users (creates with `Idempotency-Key`), while (1) one
//! instance is killed with SIGKILL and restarted, and (2) all three are restarted one by
//! one with SIGTERM. Checks:
//!
//! - the rolling restart fails no request, and HAProxy never had to retry or redispatch
//!   one (`SHUTDOWN_DELAY` covers the balancer's health checks);
//! - the kill fails only requests that were in flight (at most one per client);
//! - no acknowledged write is lost and no create is stored twice (audited in SQL);
//! - one user's accepted requests across all instances stay within quota + refill;
//! - an event stream on one instance sees writes made through the others.
//!
//! `scripts/cluster` runs it and prints its figures.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use task_api::config::AuthConfig;
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_task-api");
const SECRET: &str = "cluster-test-secret-0123456789abcdef";
/// The balancer's check interval is 500 ms and two failed checks take a server out:
/// the delay covers both with room to spare.
const SHUTDOWN_DELAY: &str = "2s";
const QUOTA: u32 = 300;
const WORKERS: usize = 8;
const USERS_PER_WORKER: usize = 6;

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false")
}

/// What the test needs: PostgreSQL, Redis and HAProxy. Missing: skip, except under CI.
fn requirements() -> Option<(String, String)> {
    let skip = |what: &str| {
        if under_ci() {
            panic!("cluster test under CI: {what}");
        }
        eprintln!("SKIPPED: cluster test: {what}");
        None
    };
    let Some(pg) = std::env::var("TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        return skip("TEST_DATABASE_URL is not set");
    };
    if !std::path::Path::new("/usr/sbin/haproxy").exists() {
        return skip("haproxy is missing (apt-get install haproxy)");
    }
    if std::net::TcpStream::connect("127.0.0.1:6379").is_err() {
        return skip("no Redis on 127.0.0.1:6379");
    }
    Some((pg, "redis://127.0.0.1:6379".into()))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn token(user: &str) -> String {
    let auth = AuthConfig {
        secret: Some(SecretString::from(SECRET)),
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

/// A database of the test's own on the PostgreSQL server, dropped afterwards.
struct Database {
    server: String,
    name: String,
}

impl Database {
    async fn create(server: &str) -> Self {
        let name = format!("cluster_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(server).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        Self {
            server: server.to_owned(),
            name,
        }
    }

    fn url(&self) -> String {
        let mut url = url::Url::parse(&self.server).unwrap();
        url.set_path(&self.name);
        url.to_string()
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&server).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}

struct Instance {
    port: u16,
    env: Vec<(&'static str, String)>,
    child: Option<Child>,
}

impl Instance {
    fn start(&mut self) {
        let mut command = Command::new(BIN);
        command.env_clear();
        for keep in ["PATH", "LLVM_PROFILE_FILE"] {
            if let Ok(value) = std::env::var(keep) {
                command.env(keep, value);
            }
        }
        command.env("PORT", self.port.to_string());
        for (name, value) in &self.env {
            command.env(name, value);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().unwrap().id().unwrap().to_string();
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    async fn wait_exit(&mut self, within: Duration) -> Duration {
        let started = Instant::now();
        let status = tokio::time::timeout(within, self.child.as_mut().unwrap().wait())
            .await
            .expect("the instance exits in time")
            .unwrap();
        let _ = status;
        self.child = None;
        started.elapsed()
    }

    async fn healthy(&self) {
        let url = format!("http://127.0.0.1:{}/health", self.port);
        for _ in 0..300 {
            if let Ok(r) = reqwest::get(&url).await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("instance on {} did not become healthy", self.port);
    }
}

/// HAProxy in the foreground, stopped by its PID when dropped.
struct Balancer {
    _child: Child,
    front: u16,
    stats: u16,
    _dir: tempfile::TempDir,
}

impl Balancer {
    fn start(backends: &[u16]) -> Self {
        let (front, stats) = (free_port(), free_port());
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, port)| format!("    server i{} 127.0.0.1:{port} check\n", i + 1))
            .collect();
        // The README's worked example, on the test's ports.
        let config = format!(
            "global
    maxconn 2000
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 10s
    # A refused connection (an instance that has just died) goes to another server;
    # a request already sent is never re-sent (the client retries it, with its key).
    retries 2
    retry-on conn-failure
    option redispatch 1
    default-server inter 500ms fall 2 rise 1
frontend api
    bind 127.0.0.1:{front}
    option forwardfor
    default_backend instances
backend instances
    balance roundrobin
    option httpchk GET /health
    http-check expect status 200
{servers}listen stats
    bind 127.0.0.1:{stats}
    stats enable
    stats uri /stats
"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let child = Command::new("/usr/sbin/haproxy")
            .args(["-db", "-f"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Self {
            _child: child,
            front,
            stats,
            _dir: dir,
        }
    }

    /// The stats CSV rows, by server name (`BACKEND` for the total).
    async fn stats(&self) -> HashMap<String, HashMap<String, String>> {
        self.try_stats().await.expect("HAProxy's stats")
    }

    async fn try_stats(&self) -> Option<HashMap<String, HashMap<String, String>>> {
        let url = format!("http://127.0.0.1:{}/stats;csv", self.stats);
        let text = reqwest::get(url).await.ok()?.text().await.ok()?;
        let mut lines = text.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap()
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let rows = lines
            .filter(|l| l.starts_with("instances,"))
            .map(|l| {
                let row: HashMap<String, String> = header
                    .iter()
                    .zip(l.split(','))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                (row["svname"].clone(), row)
            })
            .collect();
        Some(rows)
    }

    /// Retries plus redispatches HAProxy has made so far.
    async fn retries(&self) -> u64 {
        let stats = self.stats().await;
        let total = &stats["BACKEND"];
        ["wretr", "wredis"]
            .iter()
            .map(|k| total[*k].parse::<u64>().unwrap_or(0))
            .sum()
    }

    async fn wait_status(&self, server: &str, status: &str) {
        for _ in 0..300 {
            if let Some(stats) = self.try_stats().await
                && stats[server]["status"].starts_with(status)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{server} never became {status}");
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Steady = 0,
    Kill = 1,
    Rolling = 2,
}

#[derive(Debug)]
struct Failure {
    phase: u8,
    started: Instant,
    what: String,
}

#[derive(Default)]
struct WorkerReport {
    requests: u64,
    failures: Vec<Failure>,
    limited: u64,
    /// Acknowledged creates: task id → (user, the title last acknowledged).
    acked: HashMap<i64, (String, String)>,
    /// Creates never acknowledged after every retry (their outcome is unknown).
    gave_up_creates: HashMap<String, u64>,
    /// Tasks whose last PATCH was never acknowledged.
    unsure: Vec<i64>,
}

/// One client: its own users and tasks; creates carry an `Idempotency-Key` and are
/// retried with it, as a careful client would.
async fn worker(
    id: usize,
    base: String,
    phase: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
) -> WorkerReport {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let users: Vec<(String, String)> = (0..USERS_PER_WORKER)
        .map(|u| {
            let user = format!("load-{id}-{u}");
            let token = token(&user);
            (user, token)
        })
        .collect();
    let mut report = WorkerReport::default();
    let mut tasks: HashMap<String, Vec<i64>> = HashMap::new();
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let (user, token) = &users[(n as usize) % users.len()];
        let mine = tasks.entry(user.clone()).or_default();
        let choice = (n * 7 + id as u64) % 20;
        let url = format!("{base}/api/{user}/tasks");
        let started = Instant::now();
        let current = phase.load(Ordering::Relaxed);
        // A request, retried (up to 5 times) only where repeating it is safe.
        let (kind, attempts, outcome) = if choice < 4 || mine.is_empty() {
            let key = format!("{id}-{n}");
            let title = format!("task {key}");
            let mut last = None;
            let mut tries = 0;
            for _ in 0..5 {
                tries += 1;
                let r = client
                    .post(&url)
                    .bearer_auth(token)
                    .header("idempotency-key", &key)
                    .header("content-type", "application/json")
                    .body(json!({ "title": title }).to_string())
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 201 || r.status() == 200 => {
                        let task: Value =
                            serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
                        let id = task["id"].as_i64().unwrap();
                        mine.push(id);
                        report.acked.insert(id, (user.clone(), title.clone()));
                        last = Some(Ok(()));
                        break;
                    }
                    Ok(r) => last = Some(Err(format!("create: {}", r.status()))),
                    Err(e) => last = Some(Err(format!("create: {e}"))),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if !matches!(last, Some(Ok(()))) {
                *report.gave_up_creates.entry(user.clone()).or_default() += 1;
            }
            ("create", tries, last.unwrap())
        } else if choice < 7 {
            let task = mine[(n as usize) % mine.len()];
            let title = format!("patched {id}-{n}");
            let mut last = None;
            let mut tries = 0;
            for _ in 0..5 {
                tries += 1;
                let r = client
                    .patch(format!("{url}/{task}"))
                    .bearer_auth(token)
                    .header("content-type", "application/json")
                    .body(json!({ "title": title }).to_string())
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        report.acked.get_mut(&task).unwrap().1 = title.clone();
                        last = Some(Ok(()));
                        break;
                    }
                    Ok(r) => last = Some(Err(format!("patch: {}", r.status()))),
                    Err(e) => last = Some(Err(format!("patch: {e}"))),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if !matches!(last, Some(Ok(()))) {
                report.unsure.push(task);
            }
            ("patch", tries, last.unwrap())
        } else {
            let target = if choice < 14 {
                url.clone()
            } else {
                format!("{url}/{}", mine[(n as usize) % mine.len()])
            };
            let r = client.get(&target).bearer_auth(token).send().await;
            let outcome = match r {
                Ok(r) if r.status() == 200 => Ok(()),
                Ok(r) => Err(format!("get: {}", r.status())),
                Err(e) => Err(format!("get: {e}")),
            };
            ("read", 1, outcome)
        };
        let _ = kind;
        report.requests += attempts;
        // Every attempt before the last failed; so did the last one if it is an error.
        let failed = attempts - 1 + u64::from(outcome.is_err());
        for _ in 0..failed {
            let what = outcome
                .clone()
                .err()
                .unwrap_or_else(|| "retried, then succeeded".into());
            if what.contains("429") {
                report.limited += 1;
            }
            report.failures.push(Failure {
                phase: current,
                started,
                what,
            });
        }
        // About 30 requests per second per client.
        tokio::time::sleep(Duration::from_millis(33)).await;
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_behind_haproxy_survive_a_kill_and_a_rolling_restart() {
    let Some((pg, redis)) = requirements() else {
        return;
    };
    let database = Database::create(&pg).await;
    let prefix = format!("cluster:{}:", uuid::Uuid::new_v4().simple());
    let mut instances: Vec<Instance> = (0..3)
        .map(|_| Instance {
            port: free_port(),
            env: vec![
                ("HOST", "127.0.0.1".into()),
                ("DATABASE_URL", database.url()),
                ("DATABASE_MAX_CONNECTIONS", "6".into()),
                ("JWT_SECRET", SECRET.into()),
                ("REDIS_URL", redis.clone()),
                ("REDIS_KEY_PREFIX", prefix.clone()),
                ("RATE_LIMIT", QUOTA.to_string()),
                ("RATE_LIMIT_WINDOW", "60s".into()),
                ("SHUTDOWN_DELAY", SHUTDOWN_DELAY.into()),
                ("TRUSTED_PROXIES", "127.0.0.1".into()),
                ("RUST_LOG", "warn".into()),
            ],
            child: None,
        })
        .collect();
    // The first runs the migrations; the others start together.
    instances[0].start();
    instances[0].healthy().await;
    for instance in &mut instances[1..] {
        instance.start();
    }
    for instance in &instances {
        instance.healthy().await;
    }
    let balancer = Balancer::start(&instances.iter().map(|i| i.port).collect::<Vec<_>>());
    for server in ["i1", "i2", "i3"] {
        balancer.wait_status(server, "UP").await;
    }
    let base = format!("http://127.0.0.1:{}", balancer.front);

    // An event stream on the third instance sees writes made on the first two.
    {
        let user = "watcher";
        let token = token(user);
        let client = reqwest::Client::new();
        let mut stream = client
            .get(format!(
                "http://127.0.0.1:{}/api/{user}/events",
                instances[2].port
            ))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(stream.status(), 200);
        let mut seen = String::new();
        for (i, instance) in instances[..2].iter().enumerate() {
            let title = format!("written on instance {}", i + 1);
            let created = client
                .post(format!(
                    "http://127.0.0.1:{}/api/{user}/tasks",
                    instance.port
                ))
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body(json!({ "title": title }).to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(created.status(), 201);
            let arrived = tokio::time::timeout(Duration::from_secs(3), async {
                while !seen.contains(&title) {
                    let chunk = stream.chunk().await.unwrap().expect("stream open");
                    seen.push_str(&String::from_utf8_lossy(&chunk));
                }
            })
            .await;
            assert!(
                arrived.is_ok(),
                "instance 3's stream missed {title}: {seen}"
            );
        }
    }

    let phase = Arc::new(AtomicU8::new(Phase::Steady as u8));
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..WORKERS)
        .map(|id| tokio::spawn(worker(id, base.clone(), phase.clone(), stop.clone())))
        .collect();
    let load_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // (1) SIGKILL one instance, restart it.
    phase.store(Phase::Kill as u8, Ordering::Relaxed);
    let killed_at = Instant::now();
    instances[0].signal("-KILL");
    instances[0].wait_exit(Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    instances[0].start();
    instances[0].healthy().await;
    balancer.wait_status("i1", "UP").await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // (2) Restart all three one by one with SIGTERM.
    let retries_before = balancer.retries().await;
    phase.store(Phase::Rolling as u8, Ordering::Relaxed);
    let rolling_started = Instant::now();
    let mut stop_times = Vec::new();
    for (i, instance) in instances.iter_mut().enumerate() {
        instance.signal("-TERM");
        stop_times.push(instance.wait_exit(Duration::from_secs(20)).await);
        instance.start();
        instance.healthy().await;
        balancer.wait_status(&format!("i{}", i + 1), "UP").await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rolling_took = rolling_started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut reports = Vec::new();
    for worker in load {
        reports.push(worker.await.unwrap());
    }
    let retries_during_rolling = balancer.retries().await - retries_before;
    let load_took = load_started.elapsed();

    let requests: u64 = reports.iter().map(|r| r.requests).sum();
    let failures: Vec<&Failure> = reports.iter().flat_map(|r| &r.failures).collect();
    let rolling_failures: Vec<_> = failures
        .iter()
        .filter(|f| f.phase == Phase::Rolling as u8)
        .collect();
    let kill_failures: Vec<_> = failures
        .iter()
        .filter(|f| f.phase == Phase::Kill as u8)
        .collect();
    let limited: u64 = reports.iter().map(|r| r.limited).sum();

    // The audit, in SQL: every acknowledged create is there with its last acknowledged
    // title, and nothing more was stored than was asked for.
    let mut conn = PgConnection::connect(&database.url()).await.unwrap();
    let rows: Vec<(i64, String, String)> =
        sqlx::query_as("SELECT id, user_id, title FROM tasks WHERE user_id LIKE 'load-%'")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let stored: HashMap<i64, (String, String)> = rows
        .into_iter()
        .map(|(id, user, title)| (id, (user, title)))
        .collect();
    let unsure: std::collections::HashSet<i64> = reports
        .iter()
        .flat_map(|r| r.unsure.iter().copied())
        .collect();
    let mut lost = Vec::new();
    let mut acked_count = 0;
    for report in &reports {
        for (id, (user, title)) in &report.acked {
            acked_count += 1;
            match stored.get(id) {
                None => lost.push(format!("task {id} of {user} is gone")),
                Some((owner, _)) if owner != user => lost.push(format!("task {id} changed owner")),
                Some((_, stored_title)) if stored_title != title && !unsure.contains(id) => lost
                    .push(format!(
                        "task {id}: {stored_title:?}, acknowledged {title:?}"
                    )),
                _ => {}
            }
        }
    }
    let gave_up: u64 = reports
        .iter()
        .flat_map(|r| r.gave_up_creates.values())
        .sum();
    let extra = stored.len() as i64 - acked_count as i64;

    // One user, as fast as four connections go, through the balancer, for 3 s and until
    // the quota is spent (however slow the machine): accepted requests stay within the
    // quota plus what refills meanwhile.
    let greedy = token("greedy");
    let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let greedy_started = Instant::now();
    let hammer: Vec<_> = (0..4)
        .map(|_| {
            let (base, token) = (base.clone(), greedy.clone());
            let (accepted, refused) = (accepted.clone(), refused.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let busy = || {
                    greedy_started.elapsed() < Duration::from_secs(3)
                        || refused.load(Ordering::Relaxed) < 20
                };
                while busy() && greedy_started.elapsed() < Duration::from_secs(30) {
                    let r = client
                        .get(format!("{base}/api/greedy/tasks"))
                        .bearer_auth(&token)
                        .send()
                        .await
                        .unwrap();
                    if r.status() == 200 {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    } else {
                        assert_eq!(r.status(), 429);
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in hammer {
        h.await.unwrap();
    }
    let greedy_took = greedy_started.elapsed().as_secs_f64();
    let accepted = accepted.load(Ordering::Relaxed);
    let allowance = f64::from(QUOTA) + (greedy_took * f64::from(QUOTA) / 60.0).ceil();

    eprintln!(
        "cluster: {requests} requests by {WORKERS} clients over {load_took:.1?} through HAProxy (3 instances, PostgreSQL, Redis)
  kill (SIGKILL one instance at +{:.1?}, restarted): {} failed requests, {} after retries gave up
  rolling restart (SIGTERM x3, SHUTDOWN_DELAY={SHUTDOWN_DELAY}, {rolling_took:.1?}; each stop took {:?}): {} failed requests, HAProxy retries/redispatches {retries_during_rolling}
  audit: {acked_count} acknowledged creates, {} stored, {} lost, {extra} unrequested ({gave_up} creates never acknowledged)
  quota: {accepted} accepted of one user's requests in {greedy_took:.1} s, allowance {allowance} (quota {QUOTA}/60 s + refill); {limited} load requests limited",
        killed_at - load_started,
        kill_failures.len(),
        kill_failures.iter().filter(|f| !f.what.contains("succeeded")).count(),
        stop_times,
        rolling_failures.len(),
        stored.len(),
        lost.len(),
    );

    assert!(
        rolling_failures.is_empty(),
        "rolling restart failed: {rolling_failures:?}"
    );
    assert_eq!(
        retries_during_rolling, 0,
        "HAProxy had to retry during the rolling restart"
    );
    assert!(
        kill_failures.len() <= WORKERS,
        "more failures than requests in flight: {kill_failures:?}"
    );
    assert!(
        kill_failures
            .iter()
            .all(|f| f.started <= killed_at + Duration::from_secs(1)),
        "a request sent well after the kill failed: {kill_failures:?}"
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(
        extra >= 0 && extra as u64 <= gave_up,
        "creates stored twice: {extra} more tasks than acknowledged"
    );
    assert_eq!(limited, 0, "the load stayed under its quota");
    assert!(
        (accepted as f64) <= allowance + 5.0,
        "{accepted} accepted, allowance {allowance}"
    );
    assert!(
        accepted >= u64::from(QUOTA),
        "the quota was available: {accepted}"
    );
    drop(balancer);
}
