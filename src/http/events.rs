//! The event stream (`GET /api/{user_id}/events`) and its tickets: who may open it, from
//! where, and the SSE encoding. What the stream sends is `events::stream`'s.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::extract::State;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{Caller, USER_ID_SEGMENT, authenticate, owns_path, path_segment};
use super::json::JsonBody;
use super::middleware::matched_route;
use super::openapi::{AccessErrors, CursorExpired, Invalid};
use crate::auth::bearer_token;
use crate::error::{ApiError, FieldError};
use crate::events::fanout::{Fanout, Full};
use crate::events::stream::{EventStream, OpenError, StreamEvent};
use crate::events::tickets::Ticket;
use crate::storage::{self, within_deadline};
use crate::sync::{Position, Refused};
use crate::tasks::rfc3339_utc;

pub static LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");
const TICKET_REFUSED: &str = "Ticket is unknown, used or expired";
/// How long a client refused for having too many streams should wait.
const STREAMS_RETRY_AFTER_SECS: u64 = 5;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(events))
        .routes(routes!(create_ticket))
}

/// A ticket for the event stream.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"ticket": "AQAAAZPnmYQAAAAAAAA3hK9d1xk2dGFsaWNl0yX1dGrl9gKQ0bcI6d1uWQ", "expires_at": "2026-01-01T10:01:00.000000Z"}))]
pub struct TicketBody {
    /// Pass it as `?ticket=` to `GET /api/{user_id}/events`, once, within 60 s.
    pub ticket: String,
    /// RFC 3339, UTC.
    #[serde(serialize_with = "rfc3339_utc")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: DateTime<Utc>,
}

/// `data` of `event: ready`: where the stream starts (also the event's `id`).
#[derive(Serialize, utoipa::ToSchema)]
#[schema(example = json!({"cursor": "AQAAAAAAAAAJAAAAAAAAAAkABmGTxzTRIxlJGpJnmKMxicrqzLAMQuk"}))]
pub struct StreamReady {
    /// A feed cursor: the stream's changes are those after it.
    pub cursor: String,
}

/// `data` of `event: token-expired`: the stream ends; reconnect with a fresh token.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(example = json!({"detail": "The token has expired: reconnect with a fresh one"}))]
pub struct StreamTokenExpired {
    pub detail: &'static str,
}

/// A single-use ticket that opens one event stream, for clients that cannot send an
/// `Authorization` header (the browser's `EventSource`).
#[utoipa::path(post, path = "/api/{user_id}/events/tickets", tag = "events", operation_id = "create_event_ticket",
    security(("bearerAuth" = [])),
    params(("user_id" = String, Path, description = "The owner's user id: the token's user (`user_id` claim, else `sub`)")),
    responses(
        (status = 201, description = "A ticket, valid for 60 s, once, for this user's event stream only; the stream it opens ends when the token that asked for it expires", body = TicketBody),
        AccessErrors))]
async fn create_ticket(
    State(app): State<AppState>,
    Caller(identity): Caller,
) -> Result<(StatusCode, JsonBody<TicketBody>), ApiError> {
    let ticket = Ticket::issue(&identity.user, storage::now())
        .map_err(|_| ApiError::Unavailable("Cannot make a ticket right now; retry shortly"))?;
    within_deadline(app.store.store_ticket(
        &identity.user,
        &ticket.id,
        ticket.expires_at,
        identity.valid_until(),
    ))
    .await?;
    let body = TicketBody {
        ticket: ticket.seal(&app.cursors),
        expires_at: ticket.expires_at,
    };
    Ok((StatusCode::CREATED, JsonBody(body)))
}

/// The user's changes as they happen, as server-sent events.
#[utoipa::path(get, path = "/api/{user_id}/events", tag = "events", operation_id = "stream_events",
    security(("bearerAuth" = []), ("eventTicket" = [])),
    params(
        ("user_id" = String, Path, description = "The owner's user id"),
        ("ticket" = Option<String>, Query, description = "A ticket from `POST /api/{user_id}/events/tickets`, for clients that cannot send `Authorization` (the browser's `EventSource`); used up when the stream opens. Ignored when a bearer token is sent. A JWT is never accepted here"),
        ("cursor" = Option<String>, Query, description = "Where to resume: a feed cursor or an event id. Every change after it comes first, then live ones. `Last-Event-ID` wins over it"),
        ("Last-Event-ID" = Option<String>, Header, description = "Where to resume (what `EventSource` sends when it reconnects): an event id or a feed cursor"),
    ),
    responses(
        (status = 200, description = "Server-sent events. First `event: ready` (`data`: `StreamReady`; `id`: the same cursor, where the stream starts); then one `event: change` per committed change (`id`: the cursor just after it; `data`: one change-feed entry, `Change`); a comment line at least every 30 s; `event: token-expired` (`data`: `StreamTokenExpired`) when the token stops being valid, and the stream ends. A stream that falls too far behind, or whose instance shuts down, is closed: resume from the last id", content_type = "text/event-stream", body = String,
         example = json!("event: ready\nid: AQAAAAAAAAAJ…\ndata: {\"cursor\":\"AQAAAAAAAAAJ…\"}\n\nevent: change\nid: AQAAAAAAAAAK…\ndata: {\"type\":\"delete\",\"task_id\":7,\"deleted_at\":\"2026-01-01T10:01:00.000000Z\"}\n\n: heartbeat\n\n")),
        CursorExpired, AccessErrors, Invalid))]
async fn events(State(app): State<AppState>, parts: Parts) -> Result<Response, ApiError> {
    let (uri, headers) = (&parts.uri, &parts.headers);
    let now = storage::now();
    let query = EventsQuery::parse(uri.query());
    let address = app.limits.client_address(&parts.extensions, headers);
    app.limits.check_address(address)?;
    let (user, token_valid_until, ticket) = match bearer_token(headers) {
        // A header that is there (valid or not) is checked, and counted, as a bearer token.
        Ok(_) | Err(ApiError::AuthInvalid(_)) => {
            let identity = authenticate(&parts, &app).await?;
            let until = identity.valid_until();
            (identity.user, Some(until), None)
        }
        Err(ApiError::AuthMissing) => {
            let sealed = query.ticket.ok_or(ApiError::AuthMissing)?;
            let Some(ticket) = Ticket::open(&app.cursors, &sealed).filter(|t| !t.expired(now))
            else {
                app.limits.failed_authentication(address).await?;
                return Err(ApiError::AuthInvalid(TICKET_REFUSED));
            };
            app.limits.admit(&ticket.user).await?;
            (ticket.user.clone(), None, Some(ticket))
        }
        Err(other) => return Err(other),
    };
    owns_path(uri, &user)?;
    let from = resume_point(&app, &user, headers, query.cursor.as_deref(), now)?;
    let subscription = app.events.subscribe(&user).map_err(|full| match full {
        Full::User => {
            app.limits.counters().limited("streams");
            ApiError::RateLimited {
                detail: "Too many open event streams for this user",
                retry_after_secs: STREAMS_RETRY_AFTER_SECS,
            }
        }
        Full::Instance => ApiError::Unavailable("Too many open event streams; retry shortly"),
    })?;
    let mut stream = EventStream::open(
        app.store.clone(),
        app.cursors.clone(),
        user.clone(),
        from,
        subscription,
        app.events.closing(),
    )
    .await
    .map_err(|e| match e {
        OpenError::Refused(refused) => ApiError::from(refused),
        OpenError::Store(e) => ApiError::from(e),
    })?;
    // Last: a ticket is used up only by a stream that opens.
    let valid_until = match (ticket, token_valid_until) {
        (Some(ticket), _) => {
            let redeemed = within_deadline(app.store.redeem_ticket(&user, &ticket.id, now)).await?;
            match redeemed {
                Some(until) if until > Utc::now() => until,
                // Used already (a replay: tickets travel in URLs), or its token has
                // expired: a failed authentication of this address.
                refused => {
                    app.limits.failed_authentication(address).await?;
                    return Err(ApiError::AuthInvalid(match refused {
                        None => TICKET_REFUSED,
                        Some(_) => "The token that asked for this ticket has expired",
                    }));
                }
            }
        }
        (None, Some(until)) => until,
        (None, None) => return Err(ApiError::AuthMissing),
    };
    stream.valid_until(valid_until);

    let events = futures_util::stream::unfold(stream, |mut stream| async move {
        let event = stream.next().await?;
        Some((Ok::<_, Infallible>(sse(event)), stream))
    });
    let keep_alive = KeepAlive::new()
        .interval(app.events.settings().heartbeat)
        .text("heartbeat");
    Ok((
        // Proxies that buffer responses (nginx) would hold events back.
        [(
            HeaderName::from_static("x-accel-buffering"),
            HeaderValue::from_static("no"),
        )],
        Sse::new(events).keep_alive(keep_alive),
    )
        .into_response())
}

fn sse(event: StreamEvent) -> Event {
    match event {
        StreamEvent::Ready { cursor } => {
            let data = json_data(&StreamReady {
                cursor: cursor.clone(),
            });
            Event::default().event("ready").id(cursor).data(data)
        }
        StreamEvent::Change { id, json } => Event::default().event("change").id(&*id).data(&*json),
        StreamEvent::TokenExpired => {
            Event::default()
                .event("token-expired")
                .data(json_data(&StreamTokenExpired {
                    detail: "The token has expired: reconnect with a fresh one",
                }))
        }
    }
}

/// An event's data: its schema's JSON (plain strings: serializing cannot fail).
fn json_data(data: &impl Serialize) -> String {
    serde_json::to_string(data).unwrap_or_default()
}

/// `Last-Event-ID`, else `?cursor=`: 422 when it is not a position issued to this user,
/// 410 when it is too old.
fn resume_point(
    app: &AppState,
    user: &str,
    headers: &HeaderMap,
    cursor: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Option<Position>, ApiError> {
    // An empty `Last-Event-ID` is what `EventSource` means by "no last id".
    let header = headers
        .get(&LAST_EVENT_ID)
        .filter(|v| !v.is_empty())
        .map(|v| v.to_str().unwrap_or("\u{0}"));
    let (raw, loc): (&str, &'static [&'static str]) = match (header, cursor) {
        (Some(id), _) => (id, &["header", "Last-Event-ID"]),
        (None, Some(cursor)) => (cursor, &["query", "cursor"]),
        (None, None) => return Ok(None),
    };
    match Position::open(&app.cursors, user, raw, now, app.sync_retention) {
        Ok(position) => Ok(Some(position)),
        Err(Refused::Expired) => Err(ApiError::CursorExpired),
        Err(Refused::Malformed) => Err(ApiError::validation(FieldError::new(
            loc,
            "value_error",
            "Value error, not an event id or cursor issued to this user",
        ))),
    }
}

/// The stream's query: `ticket` and `cursor`; the last of a repeated one counts, and
/// anything else (an `access_token` included) is ignored.
#[derive(Debug, Default, PartialEq, Eq)]
struct EventsQuery {
    ticket: Option<String>,
    cursor: Option<String>,
}

impl EventsQuery {
    fn parse(query: Option<&str>) -> Self {
        let mut parsed = Self::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*key {
                "ticket" => parsed.ticket = Some(value.into_owned()),
                "cursor" => parsed.cursor = Some(value.into_owned()),
                _ => {}
            }
        }
        parsed
    }
}

/// After a successful write to a user's tasks, wake their streams on every instance: a
/// layer outside routing, which learns from the response which route answered.
///
/// A plain service rather than `axum::middleware::from_fn`, which would box the service
/// below it and the future on every request, reads included.
#[derive(Clone)]
pub struct AnnounceWritesLayer(pub Arc<Fanout>);

impl<S> tower::Layer<S> for AnnounceWritesLayer {
    type Service = AnnounceWrites<S>;

    fn layer(&self, inner: S) -> AnnounceWrites<S> {
        AnnounceWrites {
            inner,
            events: self.0.clone(),
        }
    }
}

/// See [`AnnounceWritesLayer`].
#[derive(Clone)]
pub struct AnnounceWrites<S> {
    inner: S,
    events: Arc<Fanout>,
}

impl<S> tower::Service<Request> for AnnounceWrites<S>
where
    S: tower::Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = AnnounceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let is_write = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        let writer = is_write
            .then(|| path_segment(req.uri(), USER_ID_SEGMENT))
            .flatten()
            .and_then(|user| String::from_utf8(user.into_owned()).ok())
            .map(|user| (self.events.clone(), user));
        AnnounceFuture {
            inner: self.inner.call(req),
            writer,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`AnnounceWrites`].
    pub struct AnnounceFuture<F> {
        #[pin]
        inner: F,
        writer: Option<(Arc<Fanout>, String)>,
    }
}

impl<F, E> Future for AnnounceFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx))?;
        if let Some((events, user)) = this.writer.take()
            && response.status().is_success()
            && matches!(
                matched_route(&response),
                Some("/api/{user_id}/tasks" | "/api/{user_id}/tasks/{task_id}")
            )
        {
            events.changed(&user);
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_keeps_ticket_and_cursor_only() {
        assert_eq!(EventsQuery::parse(None), EventsQuery::default());
        assert_eq!(
            EventsQuery::parse(Some("ticket=a&cursor=b&ticket=c&access_token=x&token=y")),
            EventsQuery {
                ticket: Some("c".into()),
                cursor: Some("b".into())
            }
        );
        assert_eq!(
            EventsQuery::parse(Some("cursor=")).cursor.as_deref(),
            Some("")
        );
    }
}
