//! JSON response bodies.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// First size of a body's buffer: a task's JSON is about 250 bytes; a list grows it by
/// doubling, a few copies in all.
const INITIAL_CAPACITY: usize = 512;

/// A JSON response body, serialized into a `Vec`.
///
/// `axum::Json` serializes through `bytes::BytesMut`'s `io::Write`, where each of the
/// small writes serde_json makes (a key, a quote, a colon: about 80 for a task) is a call
/// that checks capacity and advances the buffer; into a `Vec` each is an inlined copy.
pub struct JsonBody<T>(pub T);

impl<T: Serialize> IntoResponse for JsonBody<T> {
    fn into_response(self) -> Response {
        let mut body = Vec::with_capacity(INITIAL_CAPACITY);
        match serde_json::to_writer(&mut body, &self.0) {
            Ok(()) => (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                body,
            )
                .into_response(),
            Err(error) => {
                // The service's own types always serialize; should one not, the request
                // context renders the contract's 500.
                tracing::error!(%error, "cannot serialize a response");
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[derive(Serialize)]
    struct Sample {
        title: &'static str,
        n: Vec<u32>,
        none: Option<u8>,
    }

    #[tokio::test]
    async fn a_body_is_its_json_with_the_json_content_type() {
        let response = JsonBody(Sample {
            title: "a \"quoted\" é",
            n: vec![1, 2],
            none: None,
        })
        .into_response();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"title":"a \"quoted\" é","n":[1,2],"none":null}"#
        );
    }

    #[tokio::test]
    async fn a_value_that_cannot_be_serialized_is_a_500() {
        let mut map = std::collections::BTreeMap::new();
        map.insert(vec![1u8], 1);
        let response = JsonBody(map).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
