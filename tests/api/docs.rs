//! The OpenAPI document and Swagger UI: complete and true to the router, valid OpenAPI 3.1,
//! served offline, confirmed by schemathesis and by a real browser.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::{Value, json};

use crate::support::{TestApp, tool};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

async fn document(app: &TestApp) -> Value {
    let reply = app
        .call_with_token(Method::GET, "/openapi.json", None, None)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    reply.json
}

fn schemas_have(doc: &Value, names: &[&str]) -> bool {
    names
        .iter()
        .all(|n| doc["components"]["schemas"].get(*n).is_some())
}

/// Every `$ref` in the document, so that each can be checked to resolve.
fn refs(value: &Value, found: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("$ref", Value::String(r)) => {
                        found.insert(r.clone());
                    }
                    _ => refs(v, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, found)),
        _ => {}
    }
}

async fn the_document_matches_the_router(app: TestApp) {
    let doc = document(&app).await;
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    let documented: BTreeSet<(String, String)> = paths
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let expected: BTreeSet<(String, String)> = [
        ("GET", "/api/{user_id}/tasks"),
        ("POST", "/api/{user_id}/tasks"),
        ("GET", "/api/{user_id}/tasks/{task_id}"),
        ("PUT", "/api/{user_id}/tasks/{task_id}"),
        ("PATCH", "/api/{user_id}/tasks/{task_id}"),
        ("DELETE", "/api/{user_id}/tasks/{task_id}"),
        ("GET", "/api/{user_id}/changes"),
        ("GET", "/api/{user_id}/events"),
        ("POST", "/api/{user_id}/events/tickets"),
        ("GET", "/health"),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_owned(), p.to_owned()))
    .collect();
    assert_eq!(documented, expected);

    // Each documented operation is routed; every other method on its path is 405.
    let task = app.create("alice", "probe").await;
    for (path, ops) in paths {
        let concrete = path
            .replace("{user_id}", "alice")
            .replace("{task_id}", &task["id"].to_string());
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            if method == "GET" && path.ends_with("/events") {
                // A stream, which never ends: its 200 is tested in tests/api/events.rs.
                continue;
            }
            let body = (method != "GET" && method != "DELETE")
                .then(|| json!({"title": "probe", "complete": true}));
            let reply = app
                .call(method.parse().unwrap(), &concrete, "alice", body)
                .await;
            if ops.get(method.to_lowercase()).is_some() {
                assert!(
                    reply.status.is_success(),
                    "{method} {path}: {} {}",
                    reply.status,
                    reply.json
                );
            } else {
                assert_eq!(
                    reply.status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path}"
                );
            }
        }
    }

    // The contract's fine print: each operation lists every error it can give.
    let responses = |method: &str, path: &str| -> BTreeSet<String> {
        paths[path][method]["responses"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    let set = |codes: &[&str]| codes.iter().map(|c| c.to_string()).collect::<BTreeSet<_>>();
    let base = ["401", "403", "422", "429", "500", "503"];
    let with = |extra: &[&str]| set(&[&base[..], extra].concat());
    assert_eq!(
        responses("get", "/api/{user_id}/tasks"),
        with(&["200", "304", "400"])
    );
    assert_eq!(
        responses("post", "/api/{user_id}/tasks"),
        with(&["201", "400", "409", "413", "415"])
    );
    assert_eq!(
        responses("get", "/api/{user_id}/tasks/{task_id}"),
        with(&["200", "304", "400", "404"])
    );
    for m in ["put", "patch"] {
        assert_eq!(
            responses(m, "/api/{user_id}/tasks/{task_id}"),
            with(&["200", "400", "404", "412", "413", "415", "428"])
        );
    }
    assert_eq!(
        responses("delete", "/api/{user_id}/tasks/{task_id}"),
        with(&["204", "400", "404", "412", "428"])
    );
    assert_eq!(
        responses("get", "/api/{user_id}/changes"),
        with(&["200", "410"])
    );
    assert_eq!(
        responses("get", "/api/{user_id}/events"),
        with(&["200", "410"])
    );
    let ticket: BTreeSet<String> = set(&["201", "401", "403", "429", "500", "503"]);
    assert_eq!(responses("post", "/api/{user_id}/events/tickets"), ticket);
    assert_eq!(responses("get", "/health"), set(&["200", "503"]));
    // The list's v1.1 parameters and its Link header.
    let list = &paths["/api/{user_id}/tasks"]["get"];
    let names: BTreeSet<&str> = list["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for name in ["sort", "q", "cursor", "limit", "offset", "complete"] {
        assert!(names.contains(name), "list parameter {name}");
    }
    assert!(list["responses"]["200"]["headers"]["Link"].is_object());
    assert!(schemas_have(
        &doc,
        &[
            "Feed",
            "Change",
            "TicketBody",
            "StreamReady",
            "StreamTokenExpired"
        ]
    ));
    assert_eq!(
        doc["components"]["securitySchemes"]["eventTicket"],
        json!({"type": "apiKey", "in": "query", "name": "ticket", "description": "A ticket from POST /api/{user_id}/events/tickets: opens one event stream, once, within 60 s"})
    );
    let stream = &paths["/api/{user_id}/events"]["get"];
    assert!(stream["responses"]["200"]["content"]["text/event-stream"].is_object());
    let names: BTreeSet<&str> = stream["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["user_id", "ticket", "cursor", "Last-Event-ID"]
            .into_iter()
            .collect()
    );

    // Security: bearer JWT on every task operation, none on /health.
    assert_eq!(
        doc["components"]["securitySchemes"]["bearerAuth"]["scheme"],
        "bearer"
    );
    for (path, ops) in paths {
        for (method, op) in ops.as_object().unwrap() {
            let expected = match (method.as_str(), path.as_str()) {
                // The browser's EventSource sends no headers: a ticket in the query.
                ("get", "/api/{user_id}/events") => {
                    json!([{"bearerAuth": []}, {"eventTicket": []}])
                }
                (_, p) if p.starts_with("/api") => json!([{"bearerAuth": []}]),
                _ => Value::Null,
            };
            assert_eq!(op["security"], expected, "{method} {path}");
        }
    }

    // Every reference resolves, and every schema has an example.
    let mut found = BTreeSet::new();
    refs(&doc, &mut found);
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for r in &found {
        let name = r
            .strip_prefix("#/components/schemas/")
            .expect("local schema ref");
        assert!(schemas.contains_key(name), "{r} does not resolve");
    }
    for (name, schema) in schemas {
        let example = schema.get("example").or_else(|| schema.get("examples"));
        assert!(example.is_some(), "schema {name} has no example");
    }
    // The input rules are constraints in the schema.
    let title = &schemas["NewTaskBody"]["properties"]["title"];
    assert_eq!(
        (&title["minLength"], &title["maxLength"]),
        (&json!(1), &json!(200))
    );
    assert_eq!(
        schemas["NewTaskBody"]["properties"]["description"]["maxLength"],
        1000
    );
    let limit = paths["/api/{user_id}/tasks"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "limit")
        .unwrap();
    assert_eq!(
        (&limit["schema"]["minimum"], &limit["schema"]["maximum"]),
        (&json!(1), &json!(1000))
    );
}

async fn swagger_ui_is_served_by_the_service_itself(app: TestApp) {
    let reply = app
        .send(
            Request::builder()
                .uri("/docs/")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let html = String::from_utf8(reply.raw.clone()).unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "external URL in {html}"
    );
    for asset in [
        "swagger-ui.css",
        "swagger-ui-bundle.js",
        "swagger-ui-standalone-preset.js",
        "swagger-initializer.js",
    ] {
        let reply = app
            .send(
                Request::builder()
                    .uri(format!("/docs/{asset}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{asset}");
        assert!(reply.raw.len() > 100, "{asset}");
        if asset == "swagger-initializer.js" {
            assert!(String::from_utf8_lossy(&reply.raw).contains("/openapi.json"));
        }
    }
}

/// `openapi-spec-validator` (PyPI) checks the document against the OpenAPI 3.1 schema.
async fn the_document_is_valid_openapi_3_1(app: TestApp) {
    let Some(validator) = tool(
        repo().join(".venv/bin/openapi-spec-validator"),
        "python3 -m venv .venv && .venv/bin/pip install -r tests/python/requirements.txt",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, document(&app).await.to_string()).unwrap();
    let out = Command::new(validator).arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// schemathesis (PyPI) against a live server with a valid token: every check, positive and
/// negative data, examples, coverage, fuzzing and stateful phases.
async fn schemathesis_finds_no_failures(app: TestApp) {
    let Some(st) = tool(
        repo().join(".venv/bin/schemathesis"),
        "python3 -m venv .venv && .venv/bin/pip install -r tests/python/requirements.txt",
    ) else {
        return;
    };
    // Thousands of requests a minute for one user: past any rate limit.
    let app = app
        .sibling_with(crate::support::auth_config(), &crate::support::unlimited())
        .await;
    let server = app.serve().await;
    let dir = tempfile::tempdir().unwrap();
    // The token's user is the path's user, so that generated requests get past 403.
    std::fs::write(
        dir.path().join("schemathesis.toml"),
        format!(
            "headers = {{ Authorization = \"Bearer {}\" }}\n[parameters]\n\"path.user_id\" = \"schemathesis\"\n{}",
            app.token("schemathesis"),
            // The conditional headers are held to values that pass (their grammar and
            // every refusal are tested in tests/api/conditional.rs): the coverage phase of
            // schemathesis 4.32 sends `If-Match: 0` as if its pattern admitted it.
            // Unknown query parameters and body fields are ignored by contract, never refused.
            // A cursor is valid only as the service signed it, which no schema can say: a
            // well-formed string there is rightly 422 (the cursor rules are tested in
            // tests/api/lists.rs and tests/api/changes.rs).
            "\"header.If-Match\" = \"*\"\n\"header.If-None-Match\" = \"\\\"0\\\"\"\n\
             [generation]\nallow-extra-parameters = false\n\
             [[operations]]\ninclude-name = \"POST /api/{user_id}/tasks\"\n\
             checks.positive_data_acceptance.expected-statuses = [\"2xx\", \"401\", \"403\", \"409\", \"422\", \"5xx\"]\n\
             [[operations]]\ninclude-name = \"GET /api/{user_id}/tasks\"\n\
             checks.positive_data_acceptance.expected-statuses = [\"2xx\", \"304\", \"401\", \"403\", \"422\", \"5xx\"]\n\
             [[operations]]\ninclude-name = \"GET /api/{user_id}/changes\"\n\
             checks.positive_data_acceptance.expected-statuses = [\"2xx\", \"401\", \"403\", \"410\", \"422\", \"5xx\"]\n",
        ),
    )
    .unwrap();
    let examples = std::env::var("SCHEMATHESIS_MAX_EXAMPLES").unwrap_or_else(|_| "100".into());
    let out = tokio::process::Command::new(st)
        .current_dir(dir.path())
        .args([
            "run",
            &format!("{}/openapi.json", server.base_url),
            "--checks",
            "all",
            // A create whose key repeats answers the first response even once that task is
            // deleted (contract), so the Location it gives may be gone; the stateful phase
            // reuses keys. Create-then-read is tested in tests/api/tasks.rs.
            "--exclude-checks",
            "ensure_resource_availability",
            // A successful request to the event stream never ends, which no fuzzer can
            // wait for; its rules are tested in tests/api/events.rs.
            "--exclude-operation-id",
            "stream_events",
            "--seed",
            "1",
            "-n",
            &examples,
        ])
        .env("NO_COLOR", "1")
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let summary: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("generated") || l.contains("issues") || l.contains("passed"))
        .collect();
    eprintln!("schemathesis: {}", summary.join(" | "));
    assert!(
        out.status.success(),
        "schemathesis failed:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("No issues found"), "{report}");
}

/// Headless Chromium opens /docs, authorizes with a token, runs "list tasks" and sees 200
/// with a task created beforehand. Saves a screenshot at target/docs-<backend>.png.
async fn swagger_ui_works_in_a_real_browser(app: TestApp) {
    let Some(_) = tool(
        repo().join("tests/browser/node_modules/playwright-core"),
        "npm ci --prefix tests/browser",
    ) else {
        return;
    };
    let Some(_) = tool(
        PathBuf::from("/usr/bin/chromium"),
        "apt-get install chromium",
    ) else {
        return;
    };
    let title = "Seen in the browser";
    app.create("web-user", title).await;
    let server = app.serve().await;
    let backend = app.store().backend();
    let screenshot = repo().join(format!("target/docs-{backend}.png"));
    let out = tokio::process::Command::new("node")
        .arg(repo().join("tests/browser/docs.mjs"))
        .args([&server.base_url, &app.token("web-user"), "web-user", title])
        .arg(&screenshot)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::metadata(&screenshot).unwrap().len() > 10_000,
        "screenshot saved"
    );
}

crate::on_both_databases!(
    the_document_matches_the_router,
    swagger_ui_is_served_by_the_service_itself,
    the_document_is_valid_openapi_3_1,
    schemathesis_finds_no_failures,
    swagger_ui_works_in_a_real_browser,
);
