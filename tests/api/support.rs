//! Test harness: the real router over a real SQLite file, a real PostgreSQL schema, or a
//! real PostgreSQL database behind a real PgBouncer, driven in-process through the full
//! middleware stack, with real signed tokens.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use secrecy::SecretString;
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, SqliteConnection};
use task_api::auth::{self, Verifier};
use task_api::config::{AuthConfig, CorsOrigins};
use task_api::http::{AppState, HttpOptions, app};
use task_api::metrics::Metrics;
use task_api::storage::{PgTaskStore, PoolSettings, Pooler, SqliteTaskStore, TaskStore};
use tower::ServiceExt;

pub const SECRET: &str = "integration-test-secret-0123456789abcdef";

/// Which database a test runs on, holding what must live as long as the test.
pub enum Db {
    Sqlite {
        store: SqliteTaskStore,
        _dir: tempfile::TempDir,
    },
    Postgres {
        store: PgTaskStore,
        _schema: PgSchema,
    },
    /// A second service instance on another app's PostgreSQL schema (which that app owns).
    PostgresPeer { store: PgTaskStore, url: String },
    /// PostgreSQL through PgBouncer in transaction mode (instances may share one).
    Pgbouncer {
        store: PgTaskStore,
        bouncer: Arc<Pgbouncer>,
    },
}

pub struct TestApp {
    pub router: Router,
    pub metrics: Arc<Metrics>,
    pub auth: AuthConfig,
    pub db: Db,
}

pub fn auth_config() -> AuthConfig {
    AuthConfig {
        secret: Some(SecretString::from(SECRET)),
        better_auth_url: None,
        jwks_url: None,
        issuer: None,
        audience: Vec::new(),
    }
}

/// The PostgreSQL server tests use: `TEST_DATABASE_URL`. Unset, PostgreSQL tests skip
/// and say so, except under CI, where they must run.
pub fn postgres_url() -> Option<String> {
    match std::env::var("TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false") => {
            panic!("TEST_DATABASE_URL must be set under CI: PostgreSQL tests may not skip")
        }
        _ => {
            eprintln!("SKIPPED: PostgreSQL test (set TEST_DATABASE_URL to run it)");
            None
        }
    }
}

/// A schema of its own for one test, dropped afterwards.
pub struct PgSchema {
    pub url: String,
    pub name: String,
}

impl PgSchema {
    pub async fn create(url: &str) -> Self {
        let name = format!("test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(url)
            .await
            .expect("connect to TEST_DATABASE_URL");
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        Self {
            url: url.to_owned(),
            name,
        }
    }

    /// A URL whose connections resolve unqualified names in this schema.
    pub fn url(&self) -> String {
        schema_url(&self.url, &self.name)
    }

    /// Connection options whose unqualified names resolve in this schema.
    pub fn options(&self) -> PgConnectOptions {
        PgConnectOptions::from_str(&self.url)
            .unwrap()
            .options([("search_path", self.name.as_str())])
    }
}

/// `url` with its connections' `search_path` set to `schema`.
pub fn schema_url(url: &str, schema: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-c%20search_path%3D{schema}")
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let name = &self.name;
        clean_up(&self.url, format!("DROP SCHEMA IF EXISTS {name} CASCADE"));
    }
}

/// Runs one clean-up statement on the server at `url`, from `Drop` (which cannot await):
/// a short-lived runtime on its own thread does it. Failures are ignored.
fn clean_up(url: &str, statement: String) {
    let url = url.to_owned();
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use sqlx::Executor;
            if let Ok(mut conn) = PgConnection::connect(&url).await {
                let _ = conn.execute(&*statement).await;
            }
        });
    })
    .join();
}

/// The service's options with the rate limits off, for tests that send one user's
/// requests far faster than any person would (load, races, fuzzing).
pub fn unlimited() -> HttpOptions {
    HttpOptions {
        limits: task_api::limits::LimitSettings::off(),
        ..HttpOptions::default()
    }
}

pub fn pool_settings() -> PoolSettings {
    PoolSettings {
        max_connections: 5,
        ..PoolSettings::default()
    }
}

/// The pgbouncer binary: on `PATH` or in an `sbin` directory (Debian's package puts it in
/// `/usr/sbin`). Missing, PgBouncer tests skip and say so, except under CI.
pub fn pgbouncer_binary() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join("pgbouncer"))
        .find(|candidate| candidate.is_file())
        .or_else(|| tool("/usr/sbin/pgbouncer".into(), "apt-get install -y pgbouncer"))
}

/// Server connections a test's PgBouncer opens: fewer than the service's pool, so clients
/// take turns on them.
pub const PGBOUNCER_POOL_SIZE: u32 = 2;

/// A PgBouncer in transaction mode for one test, in front of a database of its own on the
/// `TEST_DATABASE_URL` server (PgBouncer refuses the `options` startup parameter that
/// gives other tests their schemas). Dropping it stops PgBouncer and drops the database;
/// should the test process die first, PgBouncer's watcher stops it.
pub struct Pgbouncer {
    /// Through PgBouncer.
    pub url: String,
    /// Straight to the database.
    pub direct_url: String,
    server_url: String,
    database: String,
    watcher: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Pgbouncer {
    pub async fn start(pool_size: u32) -> Option<Self> {
        let server_url = postgres_url()?;
        let binary = pgbouncer_binary()?;
        let database = format!("test_pgb_{}", uuid::Uuid::new_v4().simple());
        {
            use sqlx::Executor;
            let mut conn = PgConnection::connect(&server_url)
                .await
                .expect("connect to TEST_DATABASE_URL");
            conn.execute(&*format!("CREATE DATABASE {database}"))
                .await
                .unwrap();
        }
        let server = PgConnectOptions::from_str(&server_url).unwrap();
        let mut direct = url::Url::parse(&server_url).expect("TEST_DATABASE_URL is a URL");
        direct.set_path(&database);
        let password = direct.password().map(|p| {
            percent_encoding::percent_decode_str(p)
                .decode_utf8_lossy()
                .into_owned()
        });
        let user = server.get_username().to_owned();
        let target = format!(
            "host={} port={} dbname={database} user={user}{}",
            server.get_host(),
            server.get_port(),
            password
                .map(|p| format!(" password={p}"))
                .unwrap_or_default(),
        );

        let dir = tempfile::tempdir().unwrap();
        // PgBouncer will not run as root: it then runs as `postgres`, which reads these.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let users = dir.path().join("users.txt");
        std::fs::write(&users, format!("\"{user}\" \"\"\n")).unwrap();
        let config = dir.path().join("pgbouncer.ini");
        let log = dir.path().join("pgbouncer.log");
        for _attempt in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            std::fs::write(
                &config,
                format!(
                    "[databases]\n\
                     app = {target}\n\
                     [pgbouncer]\n\
                     listen_addr = 127.0.0.1\n\
                     listen_port = {port}\n\
                     unix_socket_dir =\n\
                     auth_type = trust\n\
                     auth_file = {}\n\
                     pool_mode = transaction\n\
                     default_pool_size = {pool_size}\n\
                     max_client_conn = 200\n",
                    users.display()
                ),
            )
            .unwrap();
            std::fs::write(&log, "").unwrap();
            let mut command = std::process::Command::new("sh");
            // PgBouncer runs until this shell's stdin closes: when the guard drops, or
            // when the test process dies, however it dies.
            command
                .arg("-c")
                .arg(
                    "\"$@\" </dev/null >>\"$LOG\" 2>&1 & pid=$!
                     read -r _
                     kill -TERM $pid 2>/dev/null
                     wait $pid",
                )
                .arg("sh")
                .arg(&binary);
            if running_as_root() {
                command.args(["-u", "postgres"]);
            }
            let mut watcher = command
                .arg(&config)
                .env("LOG", &log)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("start pgbouncer");
            let started = std::time::Instant::now();
            let listening = loop {
                let output = std::fs::read_to_string(&log).unwrap_or_default();
                if output.contains(&format!("listening on 127.0.0.1:{port}")) {
                    break true;
                }
                // A port taken meanwhile, say: another attempt on another.
                if output.contains("FATAL")
                    || output.contains("ERROR")
                    || started.elapsed() > Duration::from_secs(10)
                {
                    eprintln!("pgbouncer on port {port} did not start: {output}");
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            if listening {
                return Some(Self {
                    url: format!("postgres://{user}@127.0.0.1:{port}/app"),
                    direct_url: direct.to_string(),
                    server_url,
                    database,
                    watcher,
                    _dir: dir,
                });
            }
            stop(&mut watcher);
        }
        drop_database(&server_url, &database);
        panic!("pgbouncer did not start");
    }

    /// Connection options through PgBouncer.
    pub fn options(&self) -> PgConnectOptions {
        PgConnectOptions::from_str(&self.url).unwrap()
    }
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        stop(&mut self.watcher);
        drop_database(&self.server_url, &self.database);
    }
}

/// Stops PgBouncer: its watcher, its stdin closed, stops it and waits for it.
fn stop(watcher: &mut std::process::Child) {
    drop(watcher.stdin.take());
    let _ = watcher.wait();
}

/// Drops a test's database, whoever is still connected to it.
fn drop_database(server_url: &str, name: &str) {
    clean_up(
        server_url,
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    );
}

/// Whether this process runs as root (Linux).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .map(|uids| uids.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

impl TestApp {
    pub async fn sqlite() -> Self {
        Self::sqlite_with(auth_config(), CorsOrigins::None).await
    }

    pub async fn sqlite_with(auth: AuthConfig, cors: CorsOrigins) -> Self {
        let verifier = Verifier::new(&auth);
        Self::sqlite_with_verifier(auth, verifier, cors).await
    }

    pub async fn sqlite_with_verifier(
        auth: AuthConfig,
        verifier: Verifier,
        cors: CorsOrigins,
    ) -> Self {
        let options = HttpOptions {
            cors,
            ..HttpOptions::default()
        };
        Self::sqlite_with_options(auth, verifier, &options).await
    }

    pub async fn sqlite_with_options(
        auth: AuthConfig,
        verifier: Verifier,
        options: &HttpOptions,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("tasks.db").display());
        let store = SqliteTaskStore::connect(&url, &pool_settings())
            .await
            .unwrap();
        let (router, metrics) = build(Arc::new(store.clone()), verifier, options).await;
        Self {
            router,
            metrics,
            auth,
            db: Db::Sqlite { store, _dir: dir },
        }
    }

    pub async fn postgres() -> Option<Self> {
        Self::postgres_with(auth_config(), CorsOrigins::None, |o| o).await
    }

    pub async fn postgres_with(
        auth: AuthConfig,
        cors: CorsOrigins,
        tweak: impl FnOnce(String) -> String,
    ) -> Option<Self> {
        let options = HttpOptions {
            cors,
            ..HttpOptions::default()
        };
        Self::postgres_with_options(auth, &options, tweak).await
    }

    pub async fn postgres_with_options(
        auth: AuthConfig,
        options: &HttpOptions,
        tweak: impl FnOnce(String) -> String,
    ) -> Option<Self> {
        let url = postgres_url()?;
        let schema = PgSchema::create(&url).await;
        let store = PgTaskStore::connect(&tweak(schema.url()), &pool_settings())
            .await
            .unwrap();
        let (router, metrics) = build(Arc::new(store.clone()), Verifier::new(&auth), options).await;
        Some(Self {
            router,
            metrics,
            auth,
            db: Db::Postgres {
                store,
                _schema: schema,
            },
        })
    }

    /// An app on PostgreSQL through PgBouncer in transaction mode (a pool of
    /// [`PGBOUNCER_POOL_SIZE`] server connections), as `DATABASE_POOLER=transaction`
    /// with `DATABASE_DIRECT_URL` runs it.
    pub async fn pgbouncer() -> Option<Self> {
        Self::pgbouncer_with_options(auth_config(), &HttpOptions::default()).await
    }

    pub async fn pgbouncer_with_options(auth: AuthConfig, options: &HttpOptions) -> Option<Self> {
        let bouncer = Arc::new(Pgbouncer::start(PGBOUNCER_POOL_SIZE).await?);
        let store = Self::pgbouncer_store(&bouncer, Pooler::Transaction, |o| o).await;
        Some(Self::through_pgbouncer(store, bouncer, auth, options).await)
    }

    /// A store through `bouncer`, its migrations on the direct URL.
    pub async fn pgbouncer_store(
        bouncer: &Pgbouncer,
        pooler: Pooler,
        tweak: impl FnOnce(String) -> String,
    ) -> PgTaskStore {
        let settings = PoolSettings {
            pooler,
            direct_url: Some(bouncer.direct_url.clone().into()),
            ..pool_settings()
        };
        PgTaskStore::connect(&tweak(bouncer.url.clone()), &settings)
            .await
            .unwrap()
    }

    /// An app over a store that goes through `bouncer` (whose event listener connects
    /// directly, as `DATABASE_DIRECT_URL` makes it).
    pub async fn through_pgbouncer(
        store: PgTaskStore,
        bouncer: Arc<Pgbouncer>,
        auth: AuthConfig,
        options: &HttpOptions,
    ) -> Self {
        let mut options = options.clone();
        options
            .events
            .listener_url
            .get_or_insert_with(|| bouncer.direct_url.clone().into());
        let (router, metrics) =
            build(Arc::new(store.clone()), Verifier::new(&auth), &options).await;
        Self {
            router,
            metrics,
            auth,
            db: Db::Pgbouncer { store, bouncer },
        }
    }

    /// An app over a store already opened in `schema`.
    pub async fn from_store(store: PgTaskStore, schema: PgSchema) -> Self {
        let auth = auth_config();
        let (router, metrics) = build(
            Arc::new(store.clone()),
            Verifier::new(&auth),
            &HttpOptions::default(),
        )
        .await;
        Self {
            router,
            metrics,
            auth,
            db: Db::Postgres {
                store,
                _schema: schema,
            },
        }
    }

    /// A URL to the app's PostgreSQL database and schema.
    pub fn pg_schema_url(&self) -> String {
        match &self.db {
            Db::Postgres { _schema, .. } => _schema.url(),
            Db::PostgresPeer { url, .. } => url.clone(),
            Db::Pgbouncer { bouncer, .. } => bouncer.direct_url.clone(),
            Db::Sqlite { .. } => panic!("not a PostgreSQL app"),
        }
    }

    pub fn pg_schema_options(&self) -> PgConnectOptions {
        match &self.db {
            Db::Postgres { _schema, .. } => _schema.options(),
            Db::PostgresPeer { url, .. } => PgConnectOptions::from_str(url).unwrap(),
            Db::Pgbouncer { bouncer, .. } => {
                PgConnectOptions::from_str(&bouncer.direct_url).unwrap()
            }
            Db::Sqlite { .. } => panic!("not a PostgreSQL app"),
        }
    }

    /// Another service instance on the same PostgreSQL database, with its own pool and
    /// state, as a second process behind a load balancer would be.
    pub async fn second_instance(&self, options: &HttpOptions) -> Self {
        if let Db::Pgbouncer { bouncer, .. } = &self.db {
            let store = Self::pgbouncer_store(bouncer, Pooler::Transaction, |o| o).await;
            return Self::through_pgbouncer(store, bouncer.clone(), self.auth.clone(), options)
                .await;
        }
        let url = self.pg_schema_url();
        let store = PgTaskStore::connect(&url, &pool_settings()).await.unwrap();
        let auth = self.auth.clone();
        let (router, metrics) = build(Arc::new(store.clone()), Verifier::new(&auth), options).await;
        Self {
            router,
            metrics,
            auth,
            db: Db::PostgresPeer { store, url },
        }
    }

    /// A fresh app on the same kind of database, with other settings.
    pub async fn sibling(&self, auth: AuthConfig, cors: CorsOrigins) -> Self {
        let options = HttpOptions {
            cors,
            ..HttpOptions::default()
        };
        self.sibling_with(auth, &options).await
    }

    pub async fn sibling_with(&self, auth: AuthConfig, options: &HttpOptions) -> Self {
        match &self.db {
            Db::Sqlite { .. } => {
                let verifier = Verifier::new(&auth);
                Self::sqlite_with_options(auth, verifier, options).await
            }
            Db::Postgres { .. } | Db::PostgresPeer { .. } => {
                Self::postgres_with_options(auth, options, |o| o)
                    .await
                    .expect("PostgreSQL is configured")
            }
            Db::Pgbouncer { .. } => Self::pgbouncer_with_options(auth, options)
                .await
                .expect("PgBouncer is there"),
        }
    }

    /// A second, direct connection to the app's database (to hold locks, inspect rows).
    pub async fn side_connection(&self) -> SideConnection {
        match &self.db {
            Db::Sqlite { _dir, .. } => {
                let options = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(_dir.path().join("tasks.db"));
                SideConnection::Sqlite(SqliteConnection::connect_with(&options).await.unwrap())
            }
            Db::Postgres { .. } | Db::PostgresPeer { .. } | Db::Pgbouncer { .. } => {
                SideConnection::Postgres(
                    PgConnection::connect_with(&self.pg_schema_options())
                        .await
                        .unwrap(),
                )
            }
        }
    }

    /// The SQLite database file (SQLite apps only).
    pub fn sqlite_file(&self) -> std::path::PathBuf {
        match &self.db {
            Db::Sqlite { _dir, .. } => _dir.path().join("tasks.db"),
            _ => panic!("not an SQLite app"),
        }
    }

    pub fn store(&self) -> Arc<dyn TaskStore> {
        match &self.db {
            Db::Sqlite { store, .. } => Arc::new(store.clone()),
            Db::Postgres { store, .. }
            | Db::PostgresPeer { store, .. }
            | Db::Pgbouncer { store, .. } => Arc::new(store.clone()),
        }
    }

    /// Makes the database unreachable for the rest of the test.
    pub async fn close_database(&self) {
        match &self.db {
            Db::Sqlite { store, .. } => store.close(),
            Db::Postgres { store, .. }
            | Db::PostgresPeer { store, .. }
            | Db::Pgbouncer { store, .. } => store.close(),
        }
    }

    /// Serves the app on a loopback port until the returned guard is dropped.
    pub async fn serve(&self) -> LiveServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(task_api::serve(listener, self.router.clone(), async {
            let _ = stopped.await;
        }));
        LiveServer {
            base_url,
            _stop: stop,
        }
    }

    /// A valid token for `user`, signed with the test secret.
    pub fn token(&self, user: &str) -> String {
        auth::mint(
            self.auth.secret.as_ref().unwrap(),
            &self.auth,
            user,
            Duration::from_secs(600),
        )
        .unwrap()
    }

    pub async fn send(&self, request: Request<Body>) -> Reply {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let is_json = headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        let json = if bytes.is_empty() || !is_json {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                panic!("body is not JSON: {:?}", String::from_utf8_lossy(&bytes))
            })
        };
        Reply {
            status,
            headers,
            json,
            raw: bytes.to_vec(),
        }
    }

    /// A request as `user` (a valid token for them), with an optional JSON body.
    pub async fn call(&self, method: Method, uri: &str, user: &str, body: Option<Value>) -> Reply {
        let token = self.token(user);
        self.call_with_token(method, uri, Some(&token), body).await
    }

    /// A request as `user` with extra headers and an optional JSON body.
    pub async fn call_with_headers(
        &self,
        method: Method,
        uri: &str,
        user: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Reply {
        let mut request = Request::builder().method(method).uri(uri).header(
            header::AUTHORIZATION,
            format!("Bearer {}", self.token(user)),
        );
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = match body {
            Some(body) => request
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string())),
            None => request.body(Body::empty()),
        };
        self.send(request.unwrap()).await
    }

    pub async fn call_with_token(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = match body {
            Some(body) => request
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string())),
            None => request.body(Body::empty()),
        };
        self.send(request.unwrap()).await
    }

    /// Sends a create for `user`, whatever its outcome.
    pub async fn create_reply(&self, user: &str, title: &str) -> Reply {
        self.call(
            Method::POST,
            &format!("/api/{user}/tasks"),
            user,
            Some(serde_json::json!({ "title": title })),
        )
        .await
    }

    /// Creates a task for `user` and returns it.
    pub async fn create(&self, user: &str, title: &str) -> Value {
        let reply = self
            .call(
                Method::POST,
                &format!("/api/{user}/tasks"),
                user,
                Some(serde_json::json!({ "title": title })),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
        reply.json
    }

    /// The number of tasks `user` has.
    pub async fn count(&self, user: &str) -> u64 {
        let reply = self
            .call(Method::GET, &format!("/api/{user}/tasks"), user, None)
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        reply.json["count"].as_u64().unwrap()
    }
}

async fn build(
    store: Arc<dyn TaskStore>,
    verifier: Verifier,
    options: &HttpOptions,
) -> (Router, Arc<Metrics>) {
    let cursors = task_api::storage::cursor_key(store.as_ref()).await.unwrap();
    let state = AppState::new(store, verifier, cursors);
    let metrics = state.metrics.clone();
    (app(state, options), metrics)
}

pub enum SideConnection {
    Sqlite(sqlx::SqliteConnection),
    Postgres(PgConnection),
}

impl SideConnection {
    /// Runs SQL (several statements allowed), ignoring results.
    pub async fn execute(&mut self, sql: &str) {
        use sqlx::Executor;
        match self {
            Self::Sqlite(c) => c.execute(sql).await.map(drop),
            Self::Postgres(c) => c.execute(sql).await.map(drop),
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Runs SQL, returning the database's error instead of panicking.
    pub async fn try_execute(&mut self, sql: &str) -> Result<(), String> {
        use sqlx::Executor;
        match self {
            Self::Sqlite(c) => c.execute(sql).await.map(drop),
            Self::Postgres(c) => c.execute(sql).await.map(drop),
        }
        .map_err(|e| e.to_string())
    }

    /// Blocks writers to `tasks` until [`SideConnection::release`].
    pub async fn lock_tasks(&mut self) {
        match self {
            Self::Sqlite(_) => self.execute("BEGIN EXCLUSIVE").await,
            Self::Postgres(_) => {
                self.execute("BEGIN; LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
                    .await
            }
        }
    }

    pub async fn release(&mut self) {
        self.execute("ROLLBACK").await;
    }

    /// One number from a query such as `SELECT count(*) FROM …`.
    pub async fn scalar(&mut self, sql: &str) -> i64 {
        match self {
            Self::Sqlite(c) => sqlx::query_scalar(sql).fetch_one(c).await.unwrap(),
            Self::Postgres(c) => sqlx::query_scalar(sql).fetch_one(c).await.unwrap(),
        }
    }

    /// `(id, user_id, title)` of every stored task.
    pub async fn rows(&mut self) -> Vec<(i64, String, String)> {
        let sql = "SELECT id, user_id, title FROM tasks ORDER BY id";
        match self {
            Self::Sqlite(c) => sqlx::query_as(sql).fetch_all(c).await.unwrap(),
            Self::Postgres(c) => sqlx::query_as(sql).fetch_all(c).await.unwrap(),
        }
    }
}

/// A server running the app; it stops when this is dropped.
pub struct LiveServer {
    pub base_url: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// A tool the tests need from outside Rust: present, or the test skips (and says so),
/// except under CI, where it must be there.
pub fn tool(path: std::path::PathBuf, install: &str) -> Option<std::path::PathBuf> {
    if path.exists() {
        return Some(path);
    }
    if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false") {
        panic!("{} is missing under CI: {install}", path.display());
    }
    eprintln!("SKIPPED: {} is missing ({install})", path.display());
    None
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub json: Value,
    pub raw: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts a contract-shaped error with this status and code.
    #[track_caller]
    pub fn assert_error(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "body: {}", self.json);
        assert_eq!(self.json["error_code"], code, "body: {}", self.json);
        assert_eq!(self.header("content-type"), Some("application/json"));
        let request_id = self.json["request_id"].as_str().expect("request_id");
        assert_eq!(self.header("x-request-id"), Some(request_id));
        let timestamp = self.json["timestamp"].as_str().expect("timestamp");
        assert!(
            timestamp.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(timestamp).is_ok()
        );
        assert!(!self.json["detail"].is_null());
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(self.header("www-authenticate"), Some("Bearer"));
        }
    }

    /// Asserts a 422 whose detail lists exactly these `(loc, type)` problems.
    #[track_caller]
    pub fn assert_invalid(&self, expected: &[(&[&str], &str)]) {
        self.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR");
        let got: Vec<(Vec<String>, String)> = self.json["detail"]
            .as_array()
            .expect("422 detail is a list")
            .iter()
            .map(|e| {
                assert!(e["msg"].is_string(), "{e}");
                (
                    e["loc"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|l| l.as_str().unwrap().to_owned())
                        .collect(),
                    e["type"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let expected: Vec<(Vec<String>, String)> = expected
            .iter()
            .map(|(loc, kind)| {
                (
                    loc.iter().map(|s| s.to_string()).collect(),
                    kind.to_string(),
                )
            })
            .collect();
        assert_eq!(got, expected);
    }
}

/// Asserts an RFC 3339 UTC timestamp with a `Z` suffix and returns it.
#[track_caller]
pub fn utc(value: &Value) -> chrono::DateTime<chrono::Utc> {
    let s = value.as_str().expect("timestamp string");
    assert!(s.ends_with('Z'), "{s}");
    chrono::DateTime::parse_from_rfc3339(s).unwrap().to_utc()
}

/// Declares each scenario `async fn name(app: TestApp)` as two tests: `sqlite::name` and
/// `postgres::name`.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::support::TestApp::sqlite().await).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    if let Some(app) = $crate::support::TestApp::postgres().await {
                        super::$name(app).await
                    }
                }
            )*
        }
    };
}

/// As [`on_both_databases!`], and a third test of each scenario, `pgbouncer::name`: on
/// PostgreSQL through PgBouncer in transaction mode.
#[macro_export]
macro_rules! on_both_databases_and_pgbouncer {
    ($($name:ident),* $(,)?) => {
        $crate::on_both_databases!($($name),*);
        mod pgbouncer {
            $(
                #[tokio::test]
                async fn $name() {
                    if let Some(app) = $crate::support::TestApp::pgbouncer().await {
                        super::$name(app).await
                    }
                }
            )*
        }
    };
}

/// One server-sent event as a client sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: Value,
}

/// What waiting on a stream gave.
#[derive(Debug)]
pub enum Next {
    Event(SseEvent),
    /// The server ended the stream.
    End,
    /// Nothing within the wait.
    Quiet,
}

/// A live event stream, read over real HTTP and parsed as the WHATWG rules say.
pub struct EventClient {
    response: reqwest::Response,
    buffer: String,
    /// Comment lines seen (heartbeats).
    pub comments: usize,
    pub headers: reqwest::header::HeaderMap,
}

impl EventClient {
    /// Opens `GET {base}{path}` with these headers: the stream, or the error reply.
    pub async fn open(
        base: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Self, (StatusCode, Value, reqwest::header::HeaderMap)> {
        let mut request = reqwest::Client::new().get(format!("{base}{path}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("the server answers");
        let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
        let headers = response.headers().clone();
        if status != StatusCode::OK {
            let body = response.bytes().await.unwrap_or_default();
            return Err((
                status,
                serde_json::from_slice(&body).unwrap_or(Value::Null),
                headers,
            ));
        }
        assert_eq!(
            headers.get("content-type").unwrap().to_str().unwrap(),
            "text/event-stream"
        );
        Ok(Self {
            response,
            buffer: String::new(),
            comments: 0,
            headers,
        })
    }

    /// Opens a stream with a bearer token for `user`, asserting it opened.
    pub async fn bearer(base: &str, user: &str, token: &str, extra: &[(&str, &str)]) -> Self {
        let auth = format!("Bearer {token}");
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend_from_slice(extra);
        match Self::open(base, &format!("/api/{user}/events"), &headers).await {
            Ok(client) => client,
            Err((status, body, _)) => panic!("stream refused: {status} {body}"),
        }
    }

    /// The next event within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(event) = self.parse_one() {
                return Next::Event(event);
            }
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Err(_) => return Next::Quiet,
                Ok(Ok(Some(bytes))) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                Ok(Ok(None)) | Ok(Err(_)) => return Next::End,
            }
        }
    }

    /// The next event, which must come within 5 s.
    pub async fn next(&mut self) -> SseEvent {
        match self.next_within(Duration::from_secs(5)).await {
            Next::Event(event) => event,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    /// Events until `wait` passes with none (or the stream ends).
    pub async fn drain(&mut self, wait: Duration) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while let Next::Event(event) = self.next_within(wait).await {
            out.push(event);
        }
        out
    }

    fn parse_one(&mut self) -> Option<SseEvent> {
        loop {
            let end = self.buffer.find("\n\n")?;
            let block: String = self.buffer.drain(..end + 2).collect();
            let (event, comments) = parse_sse_block(&block);
            self.comments += comments;
            if let Some(event) = event {
                return Some(event);
            }
        }
    }
}

/// One block of an event stream (up to its blank line): the event, if it has data, and
/// how many comment lines it held.
pub fn parse_sse_block(block: &str) -> (Option<SseEvent>, usize) {
    let (mut event, mut id, mut data) = (String::from("message"), None, Vec::new());
    let mut comments = 0;
    for line in block.lines() {
        if line.starts_with(':') {
            comments += 1;
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = value.to_owned(),
            "id" => id = Some(value.to_owned()),
            "data" => data.push(value.to_owned()),
            _ => {}
        }
    }
    if data.is_empty() {
        return (None, comments);
    }
    let data = data.join("\n");
    let data =
        serde_json::from_str(&data).unwrap_or_else(|_| panic!("event data is not JSON: {data:?}"));
    (Some(SseEvent { event, id, data }), comments)
}

/// Applies one change-feed entry to a client's tasks, as a client does.
pub fn apply_change(held: &mut std::collections::BTreeMap<i64, Value>, change: &Value) {
    match change["type"].as_str() {
        Some("upsert") => {
            held.insert(
                change["task"]["id"].as_i64().unwrap(),
                change["task"].clone(),
            );
        }
        Some("delete") => {
            held.remove(&change["task_id"].as_i64().unwrap());
        }
        other => panic!("unknown change type {other:?}"),
    }
}

/// The user's tasks by id, as the list returns them.
pub async fn server_tasks(app: &TestApp, user: &str) -> std::collections::BTreeMap<i64, Value> {
    let reply = app
        .call(Method::GET, &format!("/api/{user}/tasks"), user, None)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    reply.json["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_i64().unwrap(), t.clone()))
        .collect()
}
