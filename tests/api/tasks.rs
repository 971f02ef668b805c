//! The six endpoints: what they return and what they change.

use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::support::{TestApp, utc};

async fn create_returns_the_task_with_location(app: TestApp) {
    let reply = app
        .call(
            Method::POST,
            "/api/alice/tasks",
            "alice",
            // Server-owned and unknown fields are ignored.
            Some(json!({"title": "Buy milk", "id": 99, "user_id": "mallory",
                        "complete": true, "created_at": "2000-01-01T00:00:00Z", "extra": 1})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    let task = &reply.json;
    let id = task["id"].as_i64().unwrap();
    assert!(id >= 1);
    assert_eq!(task["user_id"], "alice");
    assert_eq!(task["title"], "Buy milk");
    assert_eq!(task["description"], json!(null));
    assert_eq!(task["complete"], false);
    let created = utc(&task["created_at"]);
    assert_eq!(created, utc(&task["updated_at"]));
    assert!((chrono::Utc::now() - created).num_seconds().abs() < 60);
    assert_eq!(
        reply.header("location"),
        Some(format!("/api/alice/tasks/{id}").as_str())
    );
    assert_eq!(reply.header("content-type"), Some("application/json"));

    let fetched = app
        .call(
            Method::GET,
            &format!("/api/alice/tasks/{id}"),
            "alice",
            None,
        )
        .await;
    assert_eq!(fetched.status, StatusCode::OK);
    assert_eq!(fetched.json, reply.json);
}

async fn create_keeps_title_and_description_exactly(app: TestApp) {
    let title = format!(" {} ", "é".repeat(198));
    for description in ["", "   ", "line\nbreak", "'; DROP TABLE tasks; --"] {
        let reply = app
            .call(
                Method::POST,
                "/api/alice/tasks",
                "alice",
                Some(json!({"title": title, "description": description})),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.json);
        assert_eq!(reply.json["title"], title.as_str());
        assert_eq!(reply.json["description"], description);
    }
    assert_eq!(app.count("alice").await, 4);
}

async fn list_is_oldest_first_with_count_and_only_own_tasks(app: TestApp) {
    let empty = app
        .call(Method::GET, "/api/alice/tasks", "alice", None)
        .await;
    assert_eq!(empty.status, StatusCode::OK);
    assert_eq!(empty.json, json!({"tasks": [], "count": 0}));

    let a1 = app.create("alice", "first").await;
    app.create("bob", "bob's").await;
    let a2 = app.create("alice", "second").await;
    let reply = app
        .call(Method::GET, "/api/alice/tasks", "alice", None)
        .await;
    assert_eq!(reply.json["count"], 2);
    let tasks = reply.json["tasks"].as_array().unwrap();
    assert_eq!(tasks, &vec![a1, a2]);
    assert_eq!(app.count("bob").await, 1);
}

async fn list_filters_and_pages(app: TestApp) {
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            app.create("alice", &format!("t{i}")).await["id"]
                .as_i64()
                .unwrap(),
        );
    }
    for id in [ids[1], ids[3]] {
        let r = app
            .call(
                Method::PATCH,
                &format!("/api/alice/tasks/{id}"),
                "alice",
                Some(json!({"complete": true})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let ids_of = |reply: &crate::support::Reply| -> Vec<i64> {
        let tasks = reply.json["tasks"].as_array().unwrap();
        assert_eq!(reply.json["count"], tasks.len());
        tasks.iter().map(|t| t["id"].as_i64().unwrap()).collect()
    };
    let get = async |query: &str| {
        app.call(
            Method::GET,
            &format!("/api/alice/tasks{query}"),
            "alice",
            None,
        )
        .await
    };
    assert_eq!(ids_of(&get("?complete=true").await), vec![ids[1], ids[3]]);
    assert_eq!(
        ids_of(&get("?complete=false").await),
        vec![ids[0], ids[2], ids[4]]
    );
    assert_eq!(ids_of(&get("?limit=2").await), vec![ids[0], ids[1]]);
    assert_eq!(
        ids_of(&get("?limit=2&offset=2").await),
        vec![ids[2], ids[3]]
    );
    assert_eq!(ids_of(&get("?offset=3").await), vec![ids[3], ids[4]]);
    assert_eq!(ids_of(&get("?offset=10").await), Vec::<i64>::new());
    assert_eq!(
        ids_of(&get("?complete=false&limit=1&offset=1").await),
        vec![ids[2]]
    );
    assert_eq!(ids_of(&get("?limit=1000&unknown=x").await).len(), 5);
}

async fn get_answers_404_for_missing_and_403_for_others(app: TestApp) {
    let bobs = app.create("bob", "secret plans").await;
    let id = bobs["id"].as_i64().unwrap();
    let reply = app
        .call(
            Method::GET,
            &format!("/api/alice/tasks/{id}"),
            "alice",
            None,
        )
        .await;
    reply.assert_error(StatusCode::FORBIDDEN, "AUTH_FORBIDDEN");
    assert!(!String::from_utf8_lossy(&reply.raw).contains("secret plans"));

    let reply = app
        .call(
            Method::GET,
            &format!("/api/alice/tasks/{}", id + 1000),
            "alice",
            None,
        )
        .await;
    reply.assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    assert_eq!(reply.json["detail"], "Task not found");
    // Well-formed ids beyond 32 bits are simply not found.
    for big in ["2147483648", "9223372036854775807"] {
        let reply = app
            .call(
                Method::GET,
                &format!("/api/alice/tasks/{big}"),
                "alice",
                None,
            )
            .await;
        reply.assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    }
}

async fn put_replaces_the_whole_task(app: TestApp) {
    let created = app.create("alice", "draft").await;
    let id = created["id"].as_i64().unwrap();
    let url = format!("/api/alice/tasks/{id}");
    let with_description = app
        .call(
            Method::PUT,
            &url,
            "alice",
            Some(json!({"title": "final", "description": "details", "complete": true, "user_id": "bob"})),
        )
        .await;
    assert_eq!(
        with_description.status,
        StatusCode::OK,
        "{}",
        with_description.json
    );
    assert_eq!(with_description.json["title"], "final");
    assert_eq!(with_description.json["description"], "details");
    assert_eq!(with_description.json["complete"], true);
    assert_eq!(with_description.json["user_id"], "alice");
    assert_eq!(with_description.json["created_at"], created["created_at"]);
    assert!(utc(&with_description.json["updated_at"]) > utc(&created["updated_at"]));

    // A missing description becomes null: full replacement.
    let replaced = app
        .call(
            Method::PUT,
            &url,
            "alice",
            Some(json!({"title": "again", "complete": false})),
        )
        .await;
    assert_eq!(replaced.status, StatusCode::OK);
    assert_eq!(replaced.json["description"], json!(null));
    assert_eq!(replaced.json["complete"], false);
    assert!(utc(&replaced.json["updated_at"]) > utc(&with_description.json["updated_at"]));
    let fetched = app.call(Method::GET, &url, "alice", None).await;
    assert_eq!(fetched.json, replaced.json);
}

async fn patch_changes_only_what_it_names(app: TestApp) {
    let created = app
        .call(
            Method::POST,
            "/api/alice/tasks",
            "alice",
            Some(json!({"title": "t", "description": "d"})),
        )
        .await
        .json;
    let url = format!("/api/alice/tasks/{}", created["id"]);
    let done = app
        .call(
            Method::PATCH,
            &url,
            "alice",
            Some(json!({"complete": true})),
        )
        .await;
    assert_eq!(done.status, StatusCode::OK);
    assert_eq!(
        (
            &done.json["title"],
            &done.json["description"],
            &done.json["complete"]
        ),
        (&json!("t"), &json!("d"), &json!(true))
    );
    let renamed = app
        .call(Method::PATCH, &url, "alice", Some(json!({"title": "new"})))
        .await;
    assert_eq!(
        (
            &renamed.json["title"],
            &renamed.json["description"],
            &renamed.json["complete"]
        ),
        (&json!("new"), &json!("d"), &json!(true))
    );
    let cleared = app
        .call(
            Method::PATCH,
            &url,
            "alice",
            Some(json!({"description": null})),
        )
        .await;
    assert_eq!(cleared.status, StatusCode::OK);
    assert_eq!(cleared.json["description"], json!(null));
    assert_eq!(cleared.json["title"], "new");
    assert_eq!(cleared.json["created_at"], created["created_at"]);
    let stamps =
        [&created, &done.json, &renamed.json, &cleared.json].map(|t| utc(&t["updated_at"]));
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{stamps:?}");

    let empty = app
        .call(
            Method::PATCH,
            &url,
            "alice",
            Some(json!({"id": 5, "other": 1})),
        )
        .await;
    empty.assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    let unchanged = app.call(Method::GET, &url, "alice", None).await;
    assert_eq!(unchanged.json, cleared.json);
}

async fn delete_removes_and_ids_are_never_reused(app: TestApp) {
    let first = app.create("alice", "one").await["id"].as_i64().unwrap();
    let last = app.create("alice", "two").await["id"].as_i64().unwrap();
    let url = format!("/api/alice/tasks/{last}");
    let reply = app.call(Method::DELETE, &url, "alice", None).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert!(reply.raw.is_empty());
    app.call(Method::GET, &url, "alice", None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    app.call(Method::DELETE, &url, "alice", None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    let next = app.create("alice", "three").await["id"].as_i64().unwrap();
    assert!(next > last && last > first, "{first} {last} {next}");
}

async fn another_users_task_is_never_shown_changed_or_deleted(app: TestApp) {
    let bobs = app.create("bob", "bob's").await;
    let url = format!("/api/alice/tasks/{}", bobs["id"]);
    for (method, body) in [
        (Method::PUT, Some(json!({"title": "x", "complete": true}))),
        (Method::PATCH, Some(json!({"title": "x"}))),
        (Method::DELETE, None),
    ] {
        app.call(method, &url, "alice", body)
            .await
            .assert_error(StatusCode::FORBIDDEN, "AUTH_FORBIDDEN");
    }
    let still = app
        .call(
            Method::GET,
            &format!("/api/bob/tasks/{}", bobs["id"]),
            "bob",
            None,
        )
        .await;
    assert_eq!(still.json, bobs);
}

async fn user_ids_are_opaque_path_segments(app: TestApp) {
    // Encoded slashes, dots and Unicode in a user id round-trip through the path.
    let user = "ärger/x.y z";
    let path = "/api/%C3%A4rger%2Fx.y%20z/tasks";
    let reply = app
        .call(Method::POST, path, user, Some(json!({"title": "t"})))
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.json);
    assert_eq!(reply.json["user_id"], user);
    let location = reply.header("location").unwrap().to_owned();
    assert_eq!(location, format!("{path}/{}", reply.json["id"]));
    let fetched = app.call(Method::GET, &location, user, None).await;
    assert_eq!(fetched.status, StatusCode::OK);
    // Another spelling of a different user is someone else's path.
    app.call(Method::GET, "/api/%C3%A4rger/tasks", user, None)
        .await
        .assert_error(StatusCode::FORBIDDEN, "AUTH_FORBIDDEN");
    app.call(Method::GET, "/api/%FF/tasks", user, None)
        .await
        .assert_error(StatusCode::FORBIDDEN, "AUTH_FORBIDDEN");
}

async fn updated_at_strictly_increases_within_one_microsecond(app: TestApp) {
    use task_api::tasks::{NewTask, TaskPatch, Title};
    use task_api::versions::VersionGuard;
    let store = app.store();
    let now = task_api::storage::now();
    let new = NewTask {
        title: Title::parse("t".into()).unwrap(),
        description: None,
    };
    let task = store.create("alice", &new, now).await.unwrap();
    let patch = TaskPatch {
        title: None,
        description: None,
        complete: Some(true),
    };
    // Same clock reading for every update: the stamp must still move forward.
    let mut last = task.updated_at;
    for _ in 0..3 {
        let updated = store
            .patch("alice", task.id, &patch, &VersionGuard::Any, now)
            .await
            .unwrap();
        assert!(
            updated.updated_at > last,
            "{} <= {last}",
            updated.updated_at
        );
        assert!(updated.updated_at - last < chrono::Duration::milliseconds(1));
        last = updated.updated_at;
    }
    // And through HTTP the increments stay visible to clients.
    let a = app
        .call(
            Method::PATCH,
            &format!("/api/alice/tasks/{}", task.id),
            "alice",
            Some(json!({"complete": false})),
        )
        .await;
    assert!(utc(&a.json["updated_at"]) > last);
}

async fn concurrent_creates_get_unique_ids(app: TestApp) {
    let app = std::sync::Arc::new(app);
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move {
                app.create("alice", &format!("t{i}")).await["id"]
                    .as_i64()
                    .unwrap()
            })
        })
        .collect();
    let mut ids = Vec::new();
    for h in handles {
        ids.push(h.await.unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20);
    assert_eq!(app.count("alice").await, 20);
}

crate::on_both_databases_and_pgbouncer!(
    create_returns_the_task_with_location,
    create_keeps_title_and_description_exactly,
    list_is_oldest_first_with_count_and_only_own_tasks,
    list_filters_and_pages,
    get_answers_404_for_missing_and_403_for_others,
    put_replaces_the_whole_task,
    patch_changes_only_what_it_names,
    delete_removes_and_ids_are_never_reused,
    another_users_task_is_never_shown_changed_or_deleted,
    user_ids_are_opaque_path_segments,
    updated_at_strictly_increases_within_one_microsecond,
    concurrent_creates_get_unique_ids,
);

/// SQLite checkpoints its write-ahead log as writes go on, so the log stays near its
/// 1000-page checkpoint size instead of growing by every write.
#[tokio::test]
async fn sqlite_wal_stays_bounded_under_sustained_writes() {
    use task_api::tasks::{NewTask, TaskPatch, TaskReplace, Title};
    use task_api::versions::VersionGuard;
    let app = TestApp::sqlite().await;
    let store = app.store();
    let new = NewTask {
        title: Title::parse("w".repeat(150)).unwrap(),
        description: None,
    };
    let patch = TaskPatch {
        title: None,
        description: None,
        complete: Some(true),
    };
    let replace = TaskReplace {
        title: Title::parse("r".repeat(150)).unwrap(),
        description: None,
        complete: false,
    };
    let now = task_api::storage::now();
    for _ in 0..1000 {
        let task = store.create("alice", &new, now).await.unwrap();
        store
            .patch("alice", task.id, &patch, &VersionGuard::Any, now)
            .await
            .unwrap();
        store
            .replace("alice", task.id, &replace, &VersionGuard::Any, now)
            .await
            .unwrap();
    }
    let wal = std::fs::metadata(app.sqlite_file().with_extension("db-wal"))
        .unwrap()
        .len();
    // 3000 writes of several pages each would be tens of MiB without checkpoints.
    assert!(wal < 8 << 20, "WAL is {wal} bytes");
}
