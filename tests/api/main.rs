//! Every rule of the contract, over HTTP, on SQLite and on PostgreSQL (directly, and
//! through PgBouncer in transaction mode).

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
mod limits;
mod lists;
mod metrics;
mod operations;
mod pgbouncer;
mod postgres;
mod tasks;
mod tls;
mod validation;
