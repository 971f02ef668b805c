//! The change feed.
