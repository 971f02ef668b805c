//! Interoperability with the real thing: the `better-auth` npm package (jwt plugin,
//! in-memory storage) run by Node, a user signed up over HTTP as a browser would, and the
//! JWT it issues used against this API — once for each of the five algorithms.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};
use task_api::config::CorsOrigins;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::jwks::ALGORITHMS;
use crate::support::{TestApp, auth_config};

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/better-auth")
}

/// `tests/better-auth/node_modules` is installed by `npm ci`; without it the test skips,
/// except under CI.
fn better_auth_installed() -> bool {
    if interop_dir().join("node_modules/better-auth").is_dir() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false") {
        panic!("better-auth is not installed: run `npm ci --prefix tests/better-auth`");
    }
    eprintln!("SKIPPED: Better Auth interop (run `npm ci --prefix tests/better-auth`)");
    false
}

/// A Better Auth server signing with `alg`, and its base URL.
async fn start_better_auth(alg: &str) -> (Child, String) {
    let mut child = Command::new("node")
        .arg("server.mjs")
        .arg(alg)
        .current_dir(interop_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node is installed");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("Better Auth started in time")
        .unwrap()
        .expect("Better Auth printed its address");
    let base = line
        .strip_prefix("listening ")
        .expect("listening line")
        .to_owned();
    (child, base)
}

/// Signs a user up as a browser would, then fetches their JWT from `/api/auth/token`.
/// Returns the user id and the token.
async fn sign_up_and_get_token(base: &str, email: &str) -> (String, String) {
    let client = reqwest::Client::new();
    let signed_up = client
        .post(format!("{base}/api/auth/sign-up/email"))
        .header("Origin", base)
        .header("Content-Type", "application/json")
        .body(
            json!({"email": email, "password": "correct horse battery", "name": "Interop"})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert!(
        signed_up.status().is_success(),
        "sign-up: {}",
        signed_up.status()
    );
    let cookies: Vec<String> = signed_up
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|c| c.split(';').next().map(str::to_owned))
        .collect();
    let user: Value = serde_json::from_slice(&signed_up.bytes().await.unwrap()).unwrap();
    let user_id = user["user"]["id"].as_str().unwrap().to_owned();

    let reply = client
        .get(format!("{base}/api/auth/token"))
        .header("Origin", base)
        .header("Cookie", cookies.join("; "))
        .send()
        .await
        .unwrap();
    assert!(reply.status().is_success(), "token: {}", reply.status());
    let body: Value = serde_json::from_slice(&reply.bytes().await.unwrap()).unwrap();
    (user_id, body["token"].as_str().unwrap().to_owned())
}

async fn better_auth_tokens_work_with_every_algorithm(app: TestApp) {
    if !better_auth_installed() {
        return;
    }
    for alg in ALGORITHMS {
        let (_server, base) = start_better_auth(alg).await;
        let (user, token) =
            sign_up_and_get_token(&base, &format!("{}@example.com", alg.to_lowercase())).await;
        let header: Value = {
            use base64::Engine;
            let b64 = token.split('.').next().unwrap();
            serde_json::from_slice(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(b64)
                    .unwrap(),
            )
            .unwrap()
        };
        assert_eq!(
            header["alg"], alg,
            "Better Auth signed with the configured algorithm"
        );

        // Nothing but BETTER_AUTH_URL configured.
        let mut auth = auth_config();
        auth.secret = None;
        auth.better_auth_url = Some(base.clone());
        auth.jwks_url = Some(format!("{base}/api/auth/jwks").parse().unwrap());
        let app = app.sibling(auth, CorsOrigins::None).await;

        let path = format!("/api/{user}/tasks");
        let created = app
            .call_with_token(
                Method::POST,
                &path,
                Some(&token),
                Some(json!({"title": format!("signed with {alg}")})),
            )
            .await;
        assert_eq!(
            created.status,
            StatusCode::CREATED,
            "{alg}: {}",
            created.json
        );
        assert_eq!(created.json["user_id"], user.as_str());
        let listed = app
            .call_with_token(Method::GET, &path, Some(&token), None)
            .await;
        assert_eq!(listed.status, StatusCode::OK, "{alg}");
        assert_eq!(listed.json["count"], 1);
        assert_eq!(
            listed.json["tasks"][0]["title"],
            format!("signed with {alg}")
        );
        app.call_with_token(Method::GET, "/api/someone-else/tasks", Some(&token), None)
            .await
            .assert_error(StatusCode::FORBIDDEN, "AUTH_FORBIDDEN");
    }
}

crate::on_both_databases!(better_auth_tokens_work_with_every_algorithm);
