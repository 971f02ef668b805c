//! Lists: sort, search, keyset pages.
//! Every rule of the contract, over HTTP, on SQLite and on PostgreSQL.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap, HashSet};

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{Reply, TestApp, utc};

const SORTS: [&str; 8] = [
    "id",
    "-id",
    "created_at",
    "-created_at",
    "updated_at",
    "-updated_at",
    "title",
    "-title",
];

/// A query value, form-urlencoded.
fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// `a&b`, leaving out empty parts.
fn join(parts: &[&str]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("&")
}

async fn get(app: &TestApp, user: &str, query: &str) -> Reply {
    let uri = if query.is_empty() {
        format!("/api/{user}/tasks")
    } else {
        format!("/api/{user}/tasks?{query}")
    };
    app.call(Method::GET, &uri, user, None).await
}

/// Checks the shape every 200 list answer has.
fn check_list(reply: &Reply, what: &str) {
    assert_eq!(reply.status, StatusCode::OK, "{what}: {}", reply.json);
    let tasks = reply.json["tasks"].as_array().expect("tasks");
    assert_eq!(reply.json["count"], tasks.len(), "{what}");
    for task in tasks {
        assert!(task["version"].as_i64().is_some_and(|v| v >= 1), "{task}");
    }
    let etag = reply.header("etag").expect("list ETag");
    assert!(etag.starts_with("W/\"changes-"), "{etag}");
}

/// The list answer for `query` as `user`, checked to be a well-formed 200.
async fn list(app: &TestApp, user: &str, query: &str) -> Reply {
    let reply = get(app, user, query).await;
    check_list(&reply, query);
    reply
}

fn tasks(reply: &Reply) -> Vec<Value> {
    reply.json["tasks"].as_array().unwrap().clone()
}

fn ids(reply: &Reply) -> Vec<i64> {
    reply.json["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_i64().unwrap())
        .collect()
}

fn titles(reply: &Reply) -> Vec<String> {
    reply.json["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["title"].as_str().unwrap().to_owned())
        .collect()
}

fn id_of(task: &Value) -> i64 {
    task["id"].as_i64().unwrap()
}

/// The ids of `tasks` in the order `sort` asks for, computed here from their fields.
fn sorted_ids(tasks: &[Value], sort: &str) -> Vec<i64> {
    let (descending, key) = match sort.strip_prefix('-') {
        Some(key) => (true, key),
        None => (false, sort),
    };
    let mut tasks = tasks.to_vec();
    tasks.sort_by(|a, b| {
        let by_key = match key {
            "id" => Ordering::Equal,
            "created_at" => utc(&a["created_at"]).cmp(&utc(&b["created_at"])),
            "updated_at" => utc(&a["updated_at"]).cmp(&utc(&b["updated_at"])),
            "title" => a["title"]
                .as_str()
                .unwrap()
                .cmp(b["title"].as_str().unwrap()),
            other => panic!("{other}"),
        };
        let order = by_key.then(id_of(a).cmp(&id_of(b)));
        if descending { order.reverse() } else { order }
    });
    tasks.iter().map(id_of).collect()
}

/// The `next_cursor` of a page answered with `limit`: `Some` string or `None` for null
/// (the key must be there).
fn next_cursor(reply: &Reply) -> Option<String> {
    let object = reply.json.as_object().unwrap();
    assert!(object.contains_key("next_cursor"), "{}", reply.json);
    match &reply.json["next_cursor"] {
        Value::String(c) => {
            assert!(!c.is_empty());
            Some(c.clone())
        }
        Value::Null => None,
        other => panic!("next_cursor is {other}"),
    }
}

/// The URL of `Link: <url>; rel="next"`.
fn link_url(reply: &Reply) -> Option<String> {
    let link = reply.header("link")?;
    let rest = link.strip_prefix('<').expect(link);
    let (url, params) = rest.split_once('>').expect(link);
    assert_eq!(params, "; rel=\"next\"", "{link}");
    Some(url.to_owned())
}

/// The decoded query pairs of a URL.
fn query_pairs(url: &str) -> Vec<(String, String)> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Every page of `query` with `limit`, by `next_cursor`; checks each page's cursor, Link
/// and that a page with a cursor is followed by a non-empty one (nothing changes between
/// pages). Returns the ids in order.
async fn walk(app: &TestApp, user: &str, query: &str, limit: usize) -> Vec<i64> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let limit_part = format!("limit={limit}");
        let cursor_part = cursor
            .as_ref()
            .map_or(String::new(), |c| format!("cursor={}", enc(c)));
        let q = join(&[query, &limit_part, &cursor_part]);
        let reply = list(app, user, &q).await;
        let page = ids(&reply);
        assert!(page.len() <= limit, "{q}: {page:?}");
        if cursor.is_some() {
            assert!(!page.is_empty(), "{q}: a cursor led to an empty page");
        }
        all.extend(&page);
        match next_cursor(&reply) {
            Some(c) => {
                assert_eq!(page.len(), limit, "{q}: a short page with a next_cursor");
                let link = link_url(&reply).expect("Link with a next_cursor");
                let pairs = query_pairs(&link);
                assert_eq!(pairs.last(), Some(&("cursor".to_owned(), c.clone())));
                cursor = Some(c);
            }
            None => {
                assert_eq!(reply.header("link"), None, "{q}");
                return all;
            }
        }
    }
    panic!("{query}: pages never end");
}

async fn create_with(app: &TestApp, user: &str, title: &str, description: Option<&str>) -> i64 {
    let reply = app
        .call(
            Method::POST,
            &format!("/api/{user}/tasks"),
            user,
            Some(json!({"title": title, "description": description})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.json);
    id_of(&reply.json)
}

async fn create_id(app: &TestApp, user: &str, title: &str) -> i64 {
    id_of(&app.create(user, title).await)
}

async fn patch(app: &TestApp, user: &str, id: i64, body: Value) {
    let reply = app
        .call(
            Method::PATCH,
            &format!("/api/{user}/tasks/{id}"),
            user,
            Some(body),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json);
}

async fn delete(app: &TestApp, user: &str, id: i64) {
    let reply = app
        .call(
            Method::DELETE,
            &format!("/api/{user}/tasks/{id}"),
            user,
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.json);
}

// ---------------------------------------------------------------------------------------
// Sorting

async fn every_sort_order_breaks_ties_by_id_in_the_same_direction(app: TestApp) {
    let names = ["pear", "Apple", "pear", "apple", "fig", "Apple"];
    let mut id = Vec::new();
    for title in names {
        id.push(create_id(&app, "alice", title).await);
    }
    app.create("bob", "Aardvark").await;
    // Ties on created_at (tasks 1, 2, 4) and on updated_at (tasks 3, 5).
    let mut side = app.side_connection().await;
    side.execute(&format!(
        "UPDATE tasks SET created_at = (SELECT created_at FROM tasks WHERE id = {})
         WHERE id IN ({}, {})",
        id[1], id[2], id[4]
    ))
    .await;
    side.execute(&format!(
        "UPDATE tasks SET updated_at = (SELECT updated_at FROM tasks WHERE id = {})
         WHERE id = {}",
        id[3], id[5]
    ))
    .await;
    // The oldest task becomes the most recently updated.
    patch(&app, "alice", id[0], json!({"complete": true})).await;

    let all = tasks(&list(&app, "alice", "").await);
    assert_eq!(all.len(), 6);
    let by = |order: &[usize]| order.iter().map(|&i| id[i]).collect::<Vec<_>>();
    let expected: HashMap<&str, Vec<i64>> = HashMap::from([
        ("id", by(&[0, 1, 2, 3, 4, 5])),
        ("created_at", by(&[0, 1, 2, 4, 3, 5])),
        ("updated_at", by(&[1, 2, 3, 5, 4, 0])),
        // "Apple" < "apple" < "fig" < "pear" by code point; ties by id.
        ("title", by(&[1, 5, 3, 4, 0, 2])),
    ]);
    for sort in SORTS {
        let reply = list(&app, "alice", &format!("sort={}", enc(sort))).await;
        let got = ids(&reply);
        assert_eq!(got, sorted_ids(&all, sort), "sort={sort}");
        let key = sort.trim_start_matches('-');
        let mut want = expected[key].clone();
        if sort.starts_with('-') {
            // Ties go by id in the same direction: descending is exactly the reverse.
            want.reverse();
        }
        assert_eq!(got, want, "sort={sort}");
        // Pages of one and two split the ties: the keyset goes by id within a tie.
        for limit in [1, 2] {
            let walked = walk(&app, "alice", &format!("sort={}", enc(sort)), limit).await;
            assert_eq!(walked, want, "sort={sort} limit={limit}");
        }
    }
    // No sort is sort=id; sort combines with the complete filter.
    assert_eq!(ids(&list(&app, "alice", "").await), expected["id"]);
    assert_eq!(
        ids(&list(&app, "alice", "complete=false&sort=-title").await),
        by(&[2, 4, 3, 5, 1])
    );
    assert_eq!(
        ids(&list(&app, "alice", "complete=true&sort=title").await),
        by(&[0])
    );
    // limit and offset apply to the sorted list.
    assert_eq!(
        ids(&list(&app, "alice", "sort=title&limit=2&offset=1").await),
        by(&[5, 3])
    );
}

async fn titles_sort_by_unicode_code_point(app: TestApp) {
    let names = [
        "apple",
        "Banana",
        "Zebra",
        "éclair",
        "Ωmega",
        "😀 smile",
        "ärger",
        "a",
        "Apple",
        "ab",
        "a b",
        "É",
        "z",
        "Ärger",
        "ä",
        "\u{1F600}",
        "~tilde",
        "Z",
    ];
    for title in names {
        app.create("alice", title).await;
    }
    let mut expected: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    expected.sort();
    // Spot checks of what code point order means.
    let at = |t: &str| expected.iter().position(|e| e == t).unwrap();
    assert!(at("Zebra") < at("apple") && at("Z") < at("a"));
    assert!(at("z") < at("~tilde") && at("~tilde") < at("Ärger"));
    assert!(at("ärger") < at("éclair") && at("éclair") < at("Ωmega"));
    assert!(at("Ωmega") < at("\u{1F600}") && at("\u{1F600}") < at("😀 smile"));
    assert!(at("a") < at("a b") && at("a b") < at("ab"));

    assert_eq!(titles(&list(&app, "alice", "sort=title").await), expected);
    let mut reversed = expected.clone();
    reversed.reverse();
    assert_eq!(titles(&list(&app, "alice", "sort=-title").await), reversed);
    // Keyset pages by title hold across multi-byte titles too.
    let full = ids(&list(&app, "alice", "sort=title").await);
    assert_eq!(walk(&app, "alice", "sort=title", 3).await, full);
    let full = ids(&list(&app, "alice", "sort=-title").await);
    assert_eq!(walk(&app, "alice", "sort=-title", 4).await, full);
}

/// PostgreSQL sorts titles by code point even when the column's collation is not C.
#[tokio::test]
async fn postgres_title_order_ignores_the_columns_collation() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    let mut side = app.side_connection().await;
    // A column named in a trigger's `UPDATE OF` cannot change type: the triggers on
    // `tasks` are dropped around the change and made again as they were.
    side.execute(
        "DO $$
         DECLARE defs text[]; t record; d text;
         BEGIN
             SELECT coalesce(array_agg(pg_get_triggerdef(oid)), '{}') INTO defs
             FROM pg_trigger WHERE tgrelid = 'tasks'::regclass AND NOT tgisinternal;
             FOR t IN SELECT tgname FROM pg_trigger
                      WHERE tgrelid = 'tasks'::regclass AND NOT tgisinternal LOOP
                 EXECUTE format('DROP TRIGGER %I ON tasks', t.tgname);
             END LOOP;
             ALTER TABLE tasks ALTER COLUMN title TYPE VARCHAR(200) COLLATE \"en-US-x-icu\";
             FOREACH d IN ARRAY defs LOOP
                 EXECUTE d;
             END LOOP;
         END $$",
    )
    .await;
    let triggers = side
        .scalar("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'tasks'::regclass AND NOT tgisinternal")
        .await;
    assert!(triggers >= 1);
    let names = ["b", "B", "a", "é", "Z", "A", "e", "z", "ä"];
    for title in names {
        app.create("alice", title).await;
    }
    // The collation is in effect: in en-US "a" < "B", "b", "e", "é", "z", "Z", "ä" is
    // after "a" too ("A" sorts right after or before "a"; count the rest).
    let icu_after_a = side
        .scalar("SELECT count(*) FROM tasks WHERE title > 'a' AND title NOT IN ('A', 'a')")
        .await;
    assert_eq!(icu_after_a, 7, "the ICU collation did not apply");

    let mut expected: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(
        expected,
        ["A", "B", "Z", "a", "b", "e", "z", "ä", "é"].map(String::from)
    );
    assert_eq!(titles(&list(&app, "alice", "sort=title").await), expected);
    let mut reversed = expected.clone();
    reversed.reverse();
    assert_eq!(titles(&list(&app, "alice", "sort=-title").await), reversed);
    // The keyset comparison uses code point order too.
    let full = ids(&list(&app, "alice", "sort=title").await);
    assert_eq!(walk(&app, "alice", "sort=title", 2).await, full);
    let full = ids(&list(&app, "alice", "sort=-title").await);
    assert_eq!(walk(&app, "alice", "sort=-title", 2).await, full);
}

// ---------------------------------------------------------------------------------------
// Search

async fn search_folds_case_fully_without_normalizing(app: TestApp) {
    let rows: &[(&str, Option<&str>)] = &[
        ("straße", None),                    // 0
        ("Straße", None),                    // 1
        ("STRASSE party", None),             // 2
        ("σίσυφο\u{3C2}", None),             // 3: ends in final sigma
        ("ΣΊΣΥΦΟΣ", None),                   // 4
        ("café", None),                      // 5: precomposed é
        ("cafe\u{301} noir", None),          // 6: e + combining acute
        ("party 🎉 time", None),             // 7
        ("Groceries", Some("Buy OAT milk")), // 8
        ("abc", Some("def")),                // 9
        ("100% done", None),                 // 10
        ("100 done", None),                  // 11
        ("a_b", None),                       // 12
        ("ab", None),                        // 13
        ("\u{FB01}le report", None),         // 14: the "fi" ligature
        ("İstanbul", None),                  // 15: folds to i + U+0307
        ("ınk", None),                       // 16: dotless i
        ("Ink", None),                       // 17
    ];
    let mut id = Vec::new();
    for (title, description) in rows {
        id.push(create_with(&app, "alice", title, *description).await);
    }
    // Another user's matching task never shows.
    create_with(&app, "bob", "straße", Some("🎉 oat")).await;

    let cases: &[(&str, &[usize])] = &[
        ("STRASSE", &[0, 1, 2]),
        ("strasse", &[0, 1, 2]),
        ("straße", &[0, 1, 2]),
        ("STRAẞE", &[0, 1, 2]),
        ("ẞ", &[0, 1, 2]),
        ("ΣΊΣΥΦΟΣ", &[3, 4]),
        ("σίσυφο\u{3C2}", &[3, 4]),
        ("σίσυφοσ", &[3, 4]),
        ("\u{3C2}", &[3, 4]),
        ("ΣΙΣΥΦΟΣ", &[]), // accents count: Ι is not Ί
        ("cafe", &[6]),   // not café
        ("CAFÉ", &[5]),
        ("é", &[5]),        // precomposed does not find e + U+0301
        ("e\u{301}", &[6]), // and the decomposed form does not find é
        ("E\u{301} NOIR", &[6]),
        ("🎉", &[7]),
        ("🎊", &[]),
        ("PARTY", &[2, 7]),
        ("oat", &[8]), // in the description
        ("OAT MILK", &[8]),
        ("groceries", &[8]),
        ("abc", &[9]),
        ("DEF", &[9]),
        ("cd", &[]), // across title and description: no
        ("abcdef", &[]),
        ("c d", &[]),
        ("100%", &[10]), // % and _ are literal
        ("%", &[10]),
        ("0 d", &[11]),
        ("_", &[12]),
        ("a_b", &[12]),
        ("FI", &[14]), // ﬁ folds to "fi" (full folding)
        ("FILE", &[14]),
        ("\u{FB01}", &[14]),
        ("İSTANBUL", &[15]),
        ("i\u{307}stanbul", &[15]),
        ("istanbul", &[]), // İ folds to i + U+0307, not to i
        ("INK", &[17]),    // not ınk: I folds to i (not Turkic)
        ("ınk", &[16]),
        ("nothing like it", &[]),
    ];
    for (q, want) in cases {
        let reply = list(&app, "alice", &format!("q={}", enc(q))).await;
        let want: Vec<i64> = want.iter().map(|&i| id[i]).collect();
        assert_eq!(ids(&reply), want, "q={q:?}");
        assert!(reply.json.get("next_cursor").is_none());
    }

    // With the complete filter and a sort.
    patch(&app, "alice", id[0], json!({"complete": true})).await;
    patch(&app, "alice", id[2], json!({"complete": true})).await;
    let q = enc("strasse");
    // "STRASSE party" < "Straße" < "straße"
    assert_eq!(
        ids(&list(&app, "alice", &format!("q={q}&sort=title")).await),
        vec![id[2], id[1], id[0]]
    );
    assert_eq!(
        ids(&list(&app, "alice", &format!("q={q}&sort=-title&complete=true")).await),
        vec![id[0], id[2]]
    );
    assert_eq!(
        ids(&list(&app, "alice", &format!("q={q}&complete=false")).await),
        vec![id[1]]
    );
    assert_eq!(
        ids(&list(&app, "alice", &format!("q={q}&sort=-id&limit=2&offset=1")).await),
        vec![id[1], id[0]]
    );
    assert_eq!(
        ids(&list(&app, "alice", &format!("q={q}&sort=-updated_at")).await),
        vec![id[2], id[0], id[1]]
    );

    // Search follows edits of the title and the description.
    patch(&app, "alice", id[13], json!({"title": "Zürich"})).await;
    assert_eq!(
        ids(&list(&app, "alice", &format!("q={}", enc("ZÜRICH"))).await),
        vec![id[13]]
    );
    assert_eq!(ids(&list(&app, "alice", "q=ab").await), vec![id[9]]);
    patch(&app, "alice", id[11], json!({"description": "Kaffee"})).await;
    assert_eq!(ids(&list(&app, "alice", "q=KAFFEE").await), vec![id[11]]);
    patch(&app, "alice", id[11], json!({"description": null})).await;
    assert_eq!(
        ids(&list(&app, "alice", "q=kaffee").await),
        Vec::<i64>::new()
    );
    patch(
        &app,
        "alice",
        id[8],
        json!({"title": "Errands", "description": "STRAẞE"}),
    )
    .await;
    assert_eq!(
        ids(&list(&app, "alice", "q=strasse").await),
        vec![id[0], id[1], id[2], id[8]]
    );
    assert_eq!(ids(&list(&app, "alice", "q=oat").await), Vec::<i64>::new());
}

async fn search_and_sort_are_validated(app: TestApp) {
    let long_title = "é".repeat(200);
    let long = create_id(&app, "alice", &long_title).await;
    create_id(&app, "alice", "other").await;

    get(&app, "alice", "q=")
        .await
        .assert_invalid(&[(&["query", "q"], "string_too_short")]);
    for q in ["a".repeat(201), "é".repeat(201), "😀".repeat(201)] {
        get(&app, "alice", &format!("q={}", enc(&q)))
            .await
            .assert_invalid(&[(&["query", "q"], "string_too_long")]);
    }
    // 200 characters (400 bytes) is fine, and finds the task.
    let reply = list(&app, "alice", &format!("q={}", enc(&"É".repeat(200)))).await;
    assert_eq!(ids(&reply), vec![long]);
    let reply = list(&app, "alice", &format!("q={}", enc(&"a".repeat(200)))).await;
    assert_eq!(ids(&reply), Vec::<i64>::new());
    for q in ["%00", "a%00", "%00b%00"] {
        get(&app, "alice", &format!("q={q}"))
            .await
            .assert_invalid(&[(&["query", "q"], "value_error")]);
    }

    for sort in [
        "name",
        "ID",
        "Title",
        "--id",
        "+id",
        "",
        "-",
        "title ",
        " id",
        "id,title",
        "-title-",
        "created",
        "updated-at",
        "id\0",
    ] {
        let reply = get(&app, "alice", &format!("sort={}", enc(sort))).await;
        reply.assert_invalid(&[(&["query", "sort"], "enum")]);
    }
    // All problems at once, in query order.
    get(&app, "alice", "sort=bad&q=").await.assert_invalid(&[
        (&["query", "sort"], "enum"),
        (&["query", "q"], "string_too_short"),
    ]);
    // A space given as + is a space.
    create_id(&app, "alice", "two words").await;
    assert_eq!(
        titles(&list(&app, "alice", "q=TWO+WORDS").await),
        ["two words"]
    );
    assert_eq!(titles(&list(&app, "alice", "q=O%20W").await), ["two words"]);
}

// ---------------------------------------------------------------------------------------
// Keyset pages

async fn keyset_pages_cover_the_list_exactly_in_every_sort(app: TestApp) {
    let words = ["kiwi", "Apple", "fig", "apple", "date", "Ölbaum", "fig"];
    let mut made = Vec::new();
    for i in 0..25 {
        made.push(create_id(&app, "alice", words[i % words.len()]).await);
    }
    app.create("bob", "bob's").await;
    // Some updated_at values differ from creation order; some tasks complete.
    for &i in &[3usize, 0, 17, 9] {
        patch(&app, "alice", made[i], json!({"complete": true})).await;
    }
    for sort in SORTS {
        let all = tasks(&list(&app, "alice", &format!("sort={sort}")).await);
        let full: Vec<i64> = all.iter().map(id_of).collect();
        assert_eq!(full, sorted_ids(&all, sort), "sort={sort}");
        assert_eq!(full.len(), 25);
        for limit in [4, 5] {
            // 25 tasks by 5: the last page is full, and its next_cursor is null.
            assert_eq!(
                walk(&app, "alice", &format!("sort={sort}"), limit).await,
                full,
                "sort={sort} limit={limit}"
            );
        }
    }
    // With the complete filter and q.
    let complete = ids(&list(&app, "alice", "complete=false&sort=-created_at").await);
    assert_eq!(complete.len(), 21);
    assert_eq!(
        walk(&app, "alice", "complete=false&sort=-created_at", 4).await,
        complete
    );
    let q = format!("q={}&sort=title", enc("APPLE"));
    let found = ids(&list(&app, "alice", &q).await);
    assert_eq!(found.len(), 8);
    assert_eq!(walk(&app, "alice", &q, 3).await, found);
    // A limit beyond the list: null at once.
    let reply = list(&app, "alice", "sort=title&limit=1000").await;
    assert_eq!(next_cursor(&reply), None);
    assert_eq!(reply.header("link"), None);
    let reply = list(&app, "alice", "sort=title&limit=25").await;
    assert_eq!(next_cursor(&reply), None);
    let reply = list(&app, "alice", "sort=title&limit=24").await;
    assert!(next_cursor(&reply).is_some());
    // No limit: no next_cursor key at all.
    let reply = list(&app, "alice", "sort=title").await;
    assert!(reply.json.get("next_cursor").is_none(), "{}", reply.json);
    assert_eq!(reply.header("link"), None);
    // An empty list with a limit.
    let reply = list(&app, "carol", "limit=3").await;
    assert_eq!(reply.json["tasks"], json!([]));
    assert_eq!(next_cursor(&reply), None);
}

async fn limit_may_change_between_pages_and_no_limit_gives_the_rest(app: TestApp) {
    for i in 0..20 {
        app.create("alice", &format!("t{}", (i * 7) % 5)).await;
    }
    for sort in ["title", "-updated_at", "id"] {
        let full = ids(&list(&app, "alice", &format!("sort={sort}")).await);
        let first = list(&app, "alice", &format!("sort={sort}&limit=4")).await;
        assert_eq!(ids(&first), full[..4]);
        let c1 = next_cursor(&first).unwrap();
        let second = list(
            &app,
            "alice",
            &format!("sort={sort}&limit=7&cursor={}", enc(&c1)),
        )
        .await;
        assert_eq!(ids(&second), full[4..11]);
        let c2 = next_cursor(&second).unwrap();
        let second_again = list(
            &app,
            "alice",
            &format!("limit=1&cursor={}&sort={sort}", enc(&c1)),
        )
        .await;
        assert_eq!(ids(&second_again), full[4..5], "a cursor can be reused");
        let rest = list(&app, "alice", &format!("sort={sort}&cursor={}", enc(&c2))).await;
        assert_eq!(ids(&rest), full[11..]);
        assert_eq!(rest.json["count"], 9);
        assert!(rest.json.get("next_cursor").is_none(), "{}", rest.json);
        assert_eq!(rest.header("link"), None);
        // The page right before the end: exactly the rest, then null.
        let last = list(
            &app,
            "alice",
            &format!("sort={sort}&limit=9&cursor={}", enc(&c2)),
        )
        .await;
        assert_eq!(ids(&last), full[11..]);
        assert_eq!(next_cursor(&last), None);
        assert_eq!(last.header("link"), None);
    }
}

/// Pages `sort` with limit 5 while tasks are created and deleted between pages: every
/// task that exists throughout comes exactly once, in order, and no id repeats.
async fn churn(app: &TestApp, sort: &str) {
    let words = ["melon", "Apple", "kiwi", "apple", "fig", "Zest"];
    let mut initial = Vec::new();
    for i in 0..30 {
        initial.push(create_id(app, "alice", words[i % words.len()]).await);
    }
    // Every third task is never deleted.
    let throughout: Vec<i64> = initial.iter().copied().step_by(3).collect();
    let keep: HashSet<i64> = throughout.iter().copied().collect();
    let snapshot = tasks(&list(app, "alice", "").await);
    let expected_throughout: Vec<i64> = sorted_ids(&snapshot, sort)
        .into_iter()
        .filter(|id| keep.contains(id))
        .collect();

    let mut alive: BTreeSet<i64> = initial.iter().copied().collect();
    let mut seen: Vec<i64> = Vec::new();
    let mut created = 0;
    let mut cursor: Option<String> = None;
    for page_no in 0.. {
        assert!(page_no < 100, "pages never end");
        let cursor_part = cursor
            .as_ref()
            .map_or(String::new(), |c| format!("&cursor={}", enc(c)));
        let reply = list(app, "alice", &format!("sort={sort}&limit=5{cursor_part}")).await;
        let page = ids(&reply);
        for id in &page {
            assert!(alive.contains(id), "sort={sort}: deleted task {id} listed");
        }
        seen.extend(&page);
        let Some(next) = next_cursor(&reply) else {
            break;
        };
        cursor = Some(next);
        // Delete: the last task of this page (the cursor's own task), one seen earlier,
        // and one not yet seen, none of them kept.
        let seen_set: HashSet<i64> = seen.iter().copied().collect();
        let mut doomed = Vec::new();
        if let Some(&last) = page.last() {
            if !keep.contains(&last) {
                doomed.push(last);
            }
        }
        if let Some(&old) = seen
            .iter()
            .find(|id| alive.contains(id) && !keep.contains(id) && !doomed.contains(id))
        {
            doomed.push(old);
        }
        if let Some(&unseen) = alive
            .iter()
            .rev()
            .find(|id| !seen_set.contains(id) && !keep.contains(id))
        {
            doomed.push(unseen);
        }
        for id in doomed {
            delete(app, "alice", id).await;
            alive.remove(&id);
        }
        // Create two, which sort before or after the cursor, for the first pages.
        if page_no < 6 {
            for _ in 0..2 {
                let id = create_id(app, "alice", words[(created * 5 + 1) % words.len()]).await;
                created += 1;
                alive.insert(id);
            }
        }
    }
    let unique: HashSet<i64> = seen.iter().copied().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "sort={sort}: an id repeats: {seen:?}"
    );
    let seen_throughout: Vec<i64> = seen
        .iter()
        .copied()
        .filter(|id| keep.contains(id))
        .collect();
    assert_eq!(seen_throughout, expected_throughout, "sort={sort}");
}

async fn keyset_pages_survive_churn_by_id(app: TestApp) {
    churn(&app, "id").await;
}

async fn keyset_pages_survive_churn_by_updated_at_descending(app: TestApp) {
    churn(&app, "-updated_at").await;
}

async fn keyset_pages_survive_churn_by_title(app: TestApp) {
    churn(&app, "title").await;
}

async fn keyset_pages_survive_churn_by_title_descending(app: TestApp) {
    churn(&app, "-title").await;
}

async fn deleting_the_cursors_own_task_does_not_break_the_next_page(app: TestApp) {
    let words = ["b", "a", "c", "a", "b", "a", "c", "b", "a", "c"];
    for sort in SORTS {
        let user = format!("u{}", sort.replace('-', "d"));
        for w in words {
            app.create(&user, w).await;
        }
        let full = ids(&list(&app, &user, &format!("sort={sort}")).await);
        let first = list(&app, &user, &format!("sort={sort}&limit=3")).await;
        assert_eq!(ids(&first), full[..3]);
        let cursor = next_cursor(&first).unwrap();
        // The cursor's task and the one before it go.
        delete(&app, &user, full[2]).await;
        delete(&app, &user, full[1]).await;
        let second = list(
            &app,
            &user,
            &format!("sort={sort}&limit=3&cursor={}", enc(&cursor)),
        )
        .await;
        assert_eq!(ids(&second), full[3..6], "sort={sort}");
        // And the first task of the next page too: the page starts after it.
        let c2 = next_cursor(&second).unwrap();
        delete(&app, &user, full[5]).await;
        delete(&app, &user, full[6]).await;
        let third = list(&app, &user, &format!("sort={sort}&cursor={}", enc(&c2))).await;
        assert_eq!(ids(&third), full[7..], "sort={sort}");
    }
}

// ---------------------------------------------------------------------------------------
// Link

async fn link_header_names_the_next_page(app: TestApp) {
    for i in 0..12 {
        create_with(&app, "alice", &format!("straße {}", i % 4), Some("x")).await;
    }
    app.create("alice", "unrelated").await;
    let query = format!(
        "complete=false&limit=3&offset=2&sort=title&q={}&extra=1",
        enc("Straße")
    );
    let first = list(&app, "alice", &query).await;
    let full = ids(&list(
        &app,
        "alice",
        &format!("complete=false&sort=title&q={}", enc("Straße")),
    )
    .await);
    assert_eq!(full.len(), 12);
    assert_eq!(ids(&first), full[2..5]);
    let cursor = next_cursor(&first).unwrap();
    let link = link_url(&first).expect("Link");
    let (path, _) = link.split_once('?').expect("a query");
    assert_eq!(path, "/api/alice/tasks");
    // The request's query without offset, then the cursor.
    assert_eq!(
        query_pairs(&link),
        [
            ("complete", "false"),
            ("limit", "3"),
            ("sort", "title"),
            ("q", "Straße"),
            ("extra", "1"),
            ("cursor", cursor.as_str()),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
    );
    // Following the link is the same as sending the cursor.
    let followed = list(&app, "alice", link.split_once('?').unwrap().1).await;
    let direct = list(
        &app,
        "alice",
        &format!(
            "complete=false&limit=3&sort=title&q={}&cursor={}",
            enc("Straße"),
            enc(&cursor)
        ),
    )
    .await;
    assert_eq!(ids(&followed), full[5..8]);
    assert_eq!(followed.json, direct.json);
    // The next link replaces the old cursor; following links reaches the end.
    let mut seen = ids(&first);
    let mut reply = followed;
    loop {
        seen.extend(ids(&reply));
        let Some(link) = link_url(&reply) else {
            assert_eq!(next_cursor(&reply), None);
            break;
        };
        let pairs = query_pairs(&link);
        assert_eq!(
            pairs.iter().filter(|(k, _)| k == "cursor").count(),
            1,
            "{link}"
        );
        assert!(!pairs.iter().any(|(k, _)| k == "offset"), "{link}");
        assert_eq!(pairs.last().unwrap().1, next_cursor(&reply).unwrap());
        assert!(link.starts_with("/api/alice/tasks?"), "{link}");
        reply = list(&app, "alice", link.split_once('?').unwrap().1).await;
    }
    assert_eq!(seen, full[2..]);

    // A q with reserved and non-ASCII characters survives the Link's encoding.
    for i in 0..3 {
        app.create("alice", &format!("a+b & c=d? 🎉 {i}")).await;
    }
    let raw = "A+B & C=D? 🎉";
    let first = list(&app, "alice", &format!("q={}&limit=2", enc(raw))).await;
    assert_eq!(first.json["count"], 2);
    let link = link_url(&first).expect("Link");
    assert!(link.is_ascii(), "{link}");
    assert!(
        query_pairs(&link).contains(&("q".to_owned(), raw.to_owned())),
        "{link}"
    );
    let next = list(&app, "alice", link.split_once('?').unwrap().1).await;
    assert_eq!(titles(&next), ["a+b & c=d? 🎉 2"]);
    assert_eq!(next_cursor(&next), None);
}

// ---------------------------------------------------------------------------------------
// Cursor rules

#[track_caller]
fn assert_bad_cursor(reply: &Reply) {
    reply.assert_invalid(&[(&["query", "cursor"], "value_error")]);
}

async fn bad_cursors_are_422(app: TestApp) {
    let mut first_id = None;
    for i in 0..6 {
        let id = create_id(&app, "alice", &format!("t{i}")).await;
        first_id.get_or_insert(id);
        app.create("bob", &format!("t{i}")).await;
    }
    patch(&app, "alice", first_id.unwrap(), json!({"complete": true})).await;
    let cursor_for = async |user: &str, query: &str| {
        let reply = list(&app, user, &join(&[query, "limit=1"])).await;
        next_cursor(&reply).unwrap_or_else(|| panic!("{query}: no next_cursor"))
    };
    let plain = cursor_for("alice", "").await;
    // The cursor itself is good.
    assert_eq!(
        list(&app, "alice", &format!("cursor={}", enc(&plain)))
            .await
            .json["count"],
        5
    );

    // With offset, even 0, even given before the cursor.
    for query in [
        format!("cursor={}&offset=0", enc(&plain)),
        format!("offset=0&cursor={}", enc(&plain)),
        format!("limit=2&offset=3&cursor={}", enc(&plain)),
    ] {
        assert_bad_cursor(&get(&app, "alice", &query).await);
    }
    // Malformed.
    let mut changed = plain.clone().into_bytes();
    let middle = changed.len() / 2;
    changed[middle] = if changed[middle] == b'A' { b'B' } else { b'A' };
    let changed = String::from_utf8(changed).unwrap();
    let mut first_changed = plain.clone().into_bytes();
    first_changed[0] = if first_changed[0] == b'A' { b'B' } else { b'A' };
    let first_changed = String::from_utf8(first_changed).unwrap();
    let garbage = [
        "".to_owned(),
        "garbage".to_owned(),
        "!!!".to_owned(),
        "AAAA".to_owned(),
        "A".repeat(3000),
        changed,
        first_changed,
        plain[..plain.len() - 1].to_owned(),
        plain[1..].to_owned(),
        format!("{plain}A"),
        format!("{plain}="),
        plain.replace(['-', '_'], "+"),
    ];
    for bad in &garbage {
        if *bad == plain {
            continue;
        }
        let reply = get(&app, "alice", &format!("cursor={}", enc(bad))).await;
        assert_bad_cursor(&reply);
        let reply = get(&app, "alice", &format!("limit=2&cursor={}", enc(bad))).await;
        assert_bad_cursor(&reply);
    }
    // Made for another filter, sort, q or user; a change-feed cursor is no list cursor.
    let made_for = [
        ("", "complete=false"),
        ("", "complete=true"),
        ("", "sort=-id"),
        ("", "sort=title"),
        ("", "q=t"),
        ("complete=false", ""),
        ("complete=false", "complete=true"),
        ("sort=created_at", "sort=updated_at"),
        ("sort=created_at", "sort=-created_at"),
        ("sort=updated_at", "sort=created_at"),
        ("sort=title", "sort=-title"),
        ("sort=-title", "sort=title"),
        ("sort=-id", "sort=id"),
        ("sort=-id", ""),
        ("q=t", ""),
        ("q=t", "q=T"),
        ("q=t", "q=t&sort=title"),
        ("q=t&complete=false", "q=t&complete=true"),
    ];
    for (made, used) in made_for {
        let cursor = cursor_for("alice", made).await;
        // It works where it was made.
        let ok = list(
            &app,
            "alice",
            &join(&[made, &format!("cursor={}", enc(&cursor))]),
        )
        .await;
        assert!(ok.json["count"].as_u64().unwrap() >= 1, "{made}");
        let reply = get(
            &app,
            "alice",
            &join(&[used, &format!("cursor={}", enc(&cursor))]),
        )
        .await;
        assert_bad_cursor(&reply);
    }
    for query in ["", "sort=title", "q=t&complete=false"] {
        let bobs = cursor_for("bob", query).await;
        let reply = get(
            &app,
            "alice",
            &join(&[query, &format!("cursor={}", enc(&bobs))]),
        )
        .await;
        assert_bad_cursor(&reply);
        let reply = get(
            &app,
            "alice",
            &join(&[query, "limit=2", &format!("cursor={}", enc(&bobs))]),
        )
        .await;
        assert_bad_cursor(&reply);
    }
    let feed = app
        .call(Method::GET, "/api/alice/changes", "alice", None)
        .await;
    assert_eq!(feed.status, StatusCode::OK, "{}", feed.json);
    let feed_cursor = feed.json["cursor"].as_str().expect("feed cursor");
    assert_bad_cursor(&get(&app, "alice", &format!("cursor={}", enc(feed_cursor))).await);

    // Several problems: each one, in query order. Another parameter's problem is
    // reported along with the cursor's conflict with offset.
    get(&app, "alice", &format!("offset=x&cursor={}", enc(&plain)))
        .await
        .assert_invalid(&[
            (&["query", "offset"], "int_parsing"),
            (&["query", "cursor"], "value_error"),
        ]);
    get(
        &app,
        "alice",
        &format!("sort=nope&offset=0&cursor={}", enc(&plain)),
    )
    .await
    .assert_invalid(&[
        (&["query", "sort"], "enum"),
        (&["query", "cursor"], "value_error"),
    ]);
}

/// A cursor is opened only once the whole query is valid: with another parameter wrong,
/// a garbage cursor is not (yet) reported. The first problem must still be there.
async fn a_bad_cursor_beside_another_bad_parameter(app: TestApp) {
    app.create("alice", "t").await;
    let reply = get(&app, "alice", "sort=nope&cursor=garbage").await;
    reply.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR");
    let detail = reply.json["detail"].as_array().unwrap();
    assert_eq!(detail[0]["loc"], json!(["query", "sort"]), "{}", reply.json);
    assert_eq!(detail[0]["type"], "enum");
    let reply = get(&app, "alice", "q=&cursor=garbage").await;
    reply.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_ERROR");
    let detail = reply.json["detail"].as_array().unwrap();
    assert_eq!(detail[0]["loc"], json!(["query", "q"]), "{}", reply.json);
}

// ---------------------------------------------------------------------------------------
// ETag

async fn list_etag_is_one_for_every_list_url(app: TestApp) {
    for title in ["x-ray", "box", "other"] {
        app.create("alice", title).await;
    }
    let plain = list(&app, "alice", "").await;
    let tag = plain.header("etag").unwrap().to_owned();
    assert!(
        tag.starts_with("W/\"changes-") && tag.ends_with('"'),
        "{tag}"
    );
    let first = list(&app, "alice", "limit=1&sort=title").await;
    let cursor = next_cursor(&first).unwrap();
    let urls = [
        "sort=title&q=x".to_owned(),
        "sort=-updated_at".to_owned(),
        format!("q={}", enc("X-RAY")),
        "limit=1&sort=title".to_owned(),
        format!("limit=1&sort=title&cursor={}", enc(&cursor)),
        "complete=true&limit=5&offset=1".to_owned(),
    ];
    for query in &urls {
        let reply = list(&app, "alice", query).await;
        assert_eq!(reply.header("etag"), Some(tag.as_str()), "{query}");
        let uri = format!("/api/alice/tasks?{query}");
        for sent in [
            tag.clone(),
            tag.trim_start_matches("W/").to_owned(),
            format!("\"zzz\", {tag}"),
        ] {
            let reply = app
                .call_with_headers(
                    Method::GET,
                    &uri,
                    "alice",
                    &[("if-none-match", &sent)],
                    None,
                )
                .await;
            assert_eq!(reply.status, StatusCode::NOT_MODIFIED, "{query} {sent}");
            assert!(reply.raw.is_empty());
            assert_eq!(reply.header("etag"), Some(tag.as_str()));
        }
    }
    // Another user's writes leave it alone; any write of alice's moves it.
    app.create("bob", "x").await;
    let uri = "/api/alice/tasks?sort=title&q=x";
    let reply = app
        .call_with_headers(Method::GET, uri, "alice", &[("if-none-match", &tag)], None)
        .await;
    assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
    app.create("alice", "unrelated").await;
    let reply = app
        .call_with_headers(Method::GET, uri, "alice", &[("if-none-match", &tag)], None)
        .await;
    check_list(&reply, uri);
    let new_tag = reply.header("etag").unwrap().to_owned();
    assert_ne!(new_tag, tag);
    assert_eq!(titles(&reply), ["box", "x-ray"]);
    assert_eq!(
        list(&app, "alice", "").await.header("etag"),
        Some(new_tag.as_str())
    );
    // A bad cursor is 422 even when the tag matches.
    let reply = app
        .call_with_headers(
            Method::GET,
            "/api/alice/tasks?cursor=junk",
            "alice",
            &[("if-none-match", &new_tag)],
            None,
        )
        .await;
    assert_bad_cursor(&reply);
}

crate::on_both_databases!(
    every_sort_order_breaks_ties_by_id_in_the_same_direction,
    titles_sort_by_unicode_code_point,
    search_folds_case_fully_without_normalizing,
    search_and_sort_are_validated,
    keyset_pages_cover_the_list_exactly_in_every_sort,
    limit_may_change_between_pages_and_no_limit_gives_the_rest,
    keyset_pages_survive_churn_by_id,
    keyset_pages_survive_churn_by_updated_at_descending,
    keyset_pages_survive_churn_by_title,
    keyset_pages_survive_churn_by_title_descending,
    deleting_the_cursors_own_task_does_not_break_the_next_page,
    link_header_names_the_next_page,
    bad_cursors_are_422,
    a_bad_cursor_beside_another_bad_parameter,
    list_etag_is_one_for_every_list_url,
);
