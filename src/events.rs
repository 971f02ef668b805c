//! Live updates: the user's changes pushed as server-sent events, on every instance.
//!
//! An event is a change-feed entry (`crate::sync`) pushed. Inside an instance, one hub per
//! user with open streams reads the feed when the user's tasks change and hands the
//! changes to all of the user's streams (`fanout`); across instances, PostgreSQL
//! `LISTEN`/`NOTIFY` says whose tasks changed (`notify`). Each stream keeps its own
//! position, so none loses or repeats a change (`stream`). Browsers open streams with
//! single-use tickets (`tickets`).

pub mod fanout;
pub mod notify;
pub mod stream;
pub mod tickets;
