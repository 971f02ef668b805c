//! Every rule of the contract, over HTTP, on SQLite and on PostgreSQL.

mod support;

mod auth;
mod better_auth;
mod changes;
mod conditional;
mod docs;
mod events;
mod events_cluster;
mod hardening;
mod hostile;
mod idempotency;
mod jwks;
mod lists;
mod metrics;
mod operations;
mod postgres;
mod tasks;
mod tls;
mod validation;
