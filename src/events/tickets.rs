//! Tickets for the event stream: the browser's `EventSource` cannot send an
//! `Authorization` header, so a client holding a token asks for a ticket and puts it in
//! the stream's URL instead. A JWT itself is never accepted in a URL, where proxies and
//! browser histories keep it.
//!
//! A ticket is signed by the service (the cursor key, under its own kind) over the user
//! it is for, its expiry and a random id; so a forged or edited ticket is refused without
//! a database query, and a ticket on another user's path is recognised as such (403)
//! without being used up. The random id is stored in the database (`event_tickets`),
//! which makes the ticket single-use on every instance: opening a stream deletes the row
//! in one statement, so of two requests racing with one ticket only one gets the stream.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::cursors::{CursorKey, Kind, Reader};

/// How long a ticket may wait before it opens a stream.
pub const TICKET_TTL: Duration = Duration::from_secs(60);
/// Bytes of a ticket's random id.
const ID_BYTES: usize = 16;
/// The version of the ticket's payload layout.
const TICKET_FORMAT: u8 = 1;

/// A ticket, as issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub user: String,
    pub id: [u8; ID_BYTES],
    pub expires_at: DateTime<Utc>,
}

impl Ticket {
    /// A fresh ticket for `user`, valid for [`TICKET_TTL`] from `now`.
    pub fn issue(user: &str, now: DateTime<Utc>) -> Result<Self, getrandom::Error> {
        let mut id = [0; ID_BYTES];
        getrandom::fill(&mut id)?;
        let ttl = chrono::Duration::from_std(TICKET_TTL).unwrap_or_default();
        Ok(Self {
            user: user.to_owned(),
            id,
            expires_at: now + ttl,
        })
    }

    /// The ticket as the client gets it.
    pub fn seal(&self, key: &CursorKey) -> String {
        let mut payload = Vec::with_capacity(1 + 8 + ID_BYTES + self.user.len());
        payload.push(TICKET_FORMAT);
        payload.extend_from_slice(&self.expires_at.timestamp_micros().to_be_bytes());
        payload.extend_from_slice(&self.id);
        payload.extend_from_slice(self.user.as_bytes());
        // The user is in the payload (so it can be read before the path is compared),
        // and so signed with it; the kind keeps a ticket from opening as a cursor.
        key.seal(Kind::Ticket, "", &[], &payload)
    }

    /// A ticket this service signed; `None` for anything else. Whether it is still
    /// unused is the database's to say.
    pub fn open(key: &CursorKey, sealed: &str) -> Option<Self> {
        let payload = key.open(Kind::Ticket, "", &[], sealed)?;
        let mut r = Reader(&payload);
        if r.byte()? != TICKET_FORMAT {
            return None;
        }
        let expires_at = DateTime::from_timestamp_micros(r.i64()?)?;
        let (id, user) = r.rest().split_first_chunk::<ID_BYTES>()?;
        Some(Self {
            user: String::from_utf8(user.to_vec()).ok()?,
            id: *id,
            expires_at,
        })
    }

    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        now >= self.expires_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_round_trips_and_only_this_key_opens_it() {
        let key = CursorKey::new(b"k");
        let now = DateTime::from_timestamp(1_000, 0).unwrap();
        let ticket = Ticket::issue("alice", now).unwrap();
        assert_eq!(
            ticket.expires_at,
            DateTime::from_timestamp(1_060, 0).unwrap()
        );
        let sealed = ticket.seal(&key);
        assert_eq!(Ticket::open(&key, &sealed), Some(ticket.clone()));
        assert_eq!(Ticket::open(&CursorKey::new(b"other"), &sealed), None);
        assert!(!ticket.expired(now));
        assert!(ticket.expired(ticket.expires_at));
        // Two tickets for one user differ.
        assert_ne!(Ticket::issue("alice", now).unwrap().id, ticket.id);
    }

    #[test]
    fn cursors_and_garbage_are_not_tickets() {
        let key = CursorKey::new(b"k");
        let cursor = key.seal(Kind::Feed, "", &[], &[1; 30]);
        for bad in [
            cursor.as_str(),
            "",
            "x",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(Ticket::open(&key, bad), None, "{bad:?}");
        }
        // A sealed payload of the wrong layout.
        let short = key.seal(Kind::Ticket, "", &[], &[TICKET_FORMAT, 0, 0]);
        assert_eq!(Ticket::open(&key, &short), None);
        let wrong_format = key.seal(Kind::Ticket, "", &[], &[9; 40]);
        assert_eq!(Ticket::open(&key, &wrong_format), None);
    }
}
