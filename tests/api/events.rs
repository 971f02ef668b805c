//! Live updates: the event stream and its tickets (contract, "Live updates: server-sent
//! events"), over real HTTP on both databases.

#![allow(unused_imports)]
use crate::support::{EventClient, Next, SseEvent, TestApp};
