//! Tuning of the process's allocator (mimalloc, installed as the global allocator in
//! `main.rs`).
//!
//! mimalloc keeps pages it has freed resident for `purge_delay` milliseconds (1000 by
//! default in mimalloc 3, ten times that for whole arenas) in case they are wanted again.
//! Under bursts of connections that delay is what a server's peak RSS is made of: the
//! benchmark's memory set on SQLite (32 and 256 connections) peaked at 43.5 MiB with the
//! default and at 39.3 MiB with 10 ms, at the same throughput within noise. The
//! `mimalloc` crate has no setting for it, so the option is set through
//! `libmimalloc-sys`, the C library's own bindings.

use std::ffi::c_long;

/// The purge delay the service runs with unless `MIMALLOC_PURGE_DELAY` says otherwise.
pub const PURGE_DELAY_MS: c_long = 10;

/// `mi_option_purge_delay` in `mimalloc.h` (v2 and v3); the sys crate names the options
/// around it but not this one.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Applies [`PURGE_DELAY_MS`] unless the operator set `MIMALLOC_PURGE_DELAY`, which
/// mimalloc reads itself from the process environment when it starts (before any `.env`
/// file is read). Call once, first thing in `main`.
pub fn configure() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set only stores a value in mimalloc's option table (an atomic
        // write); any option index and value are accepted.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

/// The purge delay mimalloc is running with, in milliseconds.
pub fn purge_delay_ms() -> c_long {
    // SAFETY: mi_option_get only reads mimalloc's option table.
    unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configure_shortens_the_purge_delay_from_mimallocs_default() {
        // The test binary does not set MIMALLOC_PURGE_DELAY, so mimalloc starts from its
        // own default, and configure() replaces it.
        assert_eq!(std::env::var_os("MIMALLOC_PURGE_DELAY"), None);
        assert_eq!(purge_delay_ms(), 1000, "mimalloc's default changed");
        configure();
        assert_eq!(purge_delay_ms(), PURGE_DELAY_MS);
    }
}
