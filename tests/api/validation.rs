//! Bad input: a contract-shaped 400/413/415/422 and nothing stored or changed.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::json;

use crate::support::TestApp;

const TITLE: &[&str] = &["body", "title"];
const DESCRIPTION: &[&str] = &["body", "description"];
const COMPLETE: &[&str] = &["body", "complete"];

async fn title_rules(app: TestApp) {
    let cases = [
        (json!({}), "missing"),
        (json!({"title": null}), "string_type"),
        (json!({"title": 5}), "string_type"),
        (json!({"title": ["a"]}), "string_type"),
        (json!({"title": ""}), "string_too_short"),
        (json!({"title": "x".repeat(201)}), "string_too_long"),
        (json!({"title": "é".repeat(201)}), "string_too_long"),
        (json!({"title": "   "}), "value_error"),
        (json!({"title": "\u{3000}\u{a0}\t"}), "value_error"),
        (json!({"title": "a\u{0}b"}), "value_error"),
    ];
    for (body, kind) in cases {
        app.call(
            Method::POST,
            "/api/alice/tasks",
            "alice",
            Some(body.clone()),
        )
        .await
        .assert_invalid(&[(TITLE, kind)]);
    }
    assert_eq!(app.count("alice").await, 0);
}

async fn description_rules(app: TestApp) {
    for (description, kind) in [
        (json!("d".repeat(1001)), "string_too_long"),
        (json!(12), "string_type"),
        (json!({"a": 1}), "string_type"),
        (json!("nul\u{0}"), "value_error"),
    ] {
        app.call(
            Method::POST,
            "/api/alice/tasks",
            "alice",
            Some(json!({"title": "t", "description": description})),
        )
        .await
        .assert_invalid(&[(DESCRIPTION, kind)]);
    }
    let ok = app
        .call(
            Method::POST,
            "/api/alice/tasks",
            "alice",
            Some(json!({"title": "t", "description": "ü".repeat(1000)})),
        )
        .await;
    assert_eq!(ok.status, StatusCode::CREATED);
    assert_eq!(app.count("alice").await, 1);
}

async fn every_problem_is_listed_at_once(app: TestApp) {
    let id = app.create("alice", "t").await["id"].clone();
    app.call(
        Method::PUT,
        &format!("/api/alice/tasks/{id}"),
        "alice",
        Some(json!({"title": "", "description": 1, "complete": "true"})),
    )
    .await
    .assert_invalid(&[
        (TITLE, "string_too_short"),
        (DESCRIPTION, "string_type"),
        (COMPLETE, "bool_type"),
    ]);
}

async fn booleans_are_json_booleans_only(app: TestApp) {
    let task = app.create("alice", "t").await;
    let url = format!("/api/alice/tasks/{}", task["id"]);
    for bad in [json!("true"), json!(1), json!(0), json!(null)] {
        app.call(Method::PATCH, &url, "alice", Some(json!({"complete": bad})))
            .await
            .assert_invalid(&[(COMPLETE, "bool_type")]);
        app.call(
            Method::PUT,
            &url,
            "alice",
            Some(json!({"title": "t", "complete": bad})),
        )
        .await
        .assert_invalid(&[(COMPLETE, "bool_type")]);
    }
    app.call(Method::PUT, &url, "alice", Some(json!({"title": "t"})))
        .await
        .assert_invalid(&[(COMPLETE, "missing")]);
    app.call(Method::PATCH, &url, "alice", Some(json!({"title": null})))
        .await
        .assert_invalid(&[(TITLE, "string_type")]);
    let unchanged = app.call(Method::GET, &url, "alice", None).await;
    assert_eq!(unchanged.json, task);
}

async fn task_id_must_be_a_positive_64_bit_integer(app: TestApp) {
    for raw in [
        "abc",
        "1.5",
        "-1",
        "0",
        "9223372036854775808",
        "99999999999999999999",
        "1e3",
        "%20",
        "%FF",
    ] {
        for method in [Method::GET, Method::DELETE] {
            app.call(method, &format!("/api/alice/tasks/{raw}"), "alice", None)
                .await
                .assert_invalid(&[(
                    &["path", "task_id"],
                    match raw {
                        "-1" | "0" => "greater_than_equal",
                        "9223372036854775808" | "99999999999999999999" => "less_than_equal",
                        _ => "int_parsing",
                    },
                )]);
        }
    }
}

async fn list_query_rules(app: TestApp) {
    for (query, loc, kind) in [
        ("complete=yes", "complete", "bool_parsing"),
        ("complete=1", "complete", "bool_parsing"),
        ("complete=", "complete", "bool_parsing"),
        ("limit=0", "limit", "greater_than_equal"),
        ("limit=1001", "limit", "less_than_equal"),
        ("limit=abc", "limit", "int_parsing"),
        ("offset=-1", "offset", "greater_than_equal"),
        ("offset=1.5", "offset", "int_parsing"),
    ] {
        app.call(
            Method::GET,
            &format!("/api/alice/tasks?{query}"),
            "alice",
            None,
        )
        .await
        .assert_invalid(&[(&["query", loc], kind)]);
    }
}

async fn body_syntax_and_media_type(app: TestApp) {
    let token = app.token("alice");
    let post = |content_type: Option<&str>, body: Vec<u8>| {
        let mut r = Request::builder()
            .method(Method::POST)
            .uri("/api/alice/tasks")
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        if let Some(ct) = content_type {
            r = r.header(header::CONTENT_TYPE, ct);
        }
        r.body(Body::from(body)).unwrap()
    };
    let json_ct = Some("application/json");
    for bad_json in [
        &b"{"[..],
        b"{\"title\": }",
        b"not json",
        b"{\"title\": \"a\"} x",
        b"\xff\xfe",
        &b"["[..].repeat(10_000),
    ] {
        app.send(post(json_ct, bad_json.to_vec()))
            .await
            .assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    }
    // Lone surrogates and invalid UTF-8 inside strings.
    app.send(post(json_ct, br#"{"title": "\ud800"}"#.to_vec()))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    app.send(post(json_ct, b"{\"title\": \"\xc3\x28\"}".to_vec()))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    // JSON, but not an object.
    for not_object in ["[]", "\"title\"", "42", "null"] {
        app.send(post(json_ct, not_object.into()))
            .await
            .assert_invalid(&[(&["body"], "model_attributes_type")]);
    }
    app.send(post(json_ct, Vec::new()))
        .await
        .assert_invalid(&[(&["body"], "missing")]);
    for other in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        app.send(post(Some(other), br#"{"title": "t"}"#.to_vec()))
            .await
            .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE");
    }
    app.send(post(None, br#"{"title": "t"}"#.to_vec()))
        .await
        .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE");
    assert_eq!(app.count("alice").await, 0);
    // Parameters and +json types are JSON.
    for ok in [
        "application/json; charset=utf-8",
        "application/merge-patch+json",
    ] {
        let reply = app
            .send(post(Some(ok), br#"{"title": "t"}"#.to_vec()))
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{ok}");
    }
}

async fn bodies_over_64_kib_are_refused(app: TestApp) {
    let token = app.token("alice");
    let big = json!({"title": "t", "padding": "x".repeat(64 * 1024)}).to_string();
    let request = Request::builder()
        .method(Method::POST)
        .uri("/api/alice/tasks")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(big))
        .unwrap();
    app.send(request)
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE");
    // Just under the limit is read (and then judged on its fields).
    let fits = json!({"title": "t", "padding": "x".repeat(60 * 1024)}).to_string();
    let request = Request::builder()
        .method(Method::POST)
        .uri("/api/alice/tasks")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(fits))
        .unwrap();
    assert_eq!(app.send(request).await.status, StatusCode::CREATED);
    assert_eq!(app.count("alice").await, 1);
}

crate::on_both_databases!(
    title_rules,
    description_rules,
    every_problem_is_listed_at_once,
    booleans_are_json_booleans_only,
    task_id_must_be_a_positive_64_bit_integer,
    list_query_rules,
    body_syntax_and_media_type,
    bodies_over_64_kib_are_refused,
);
