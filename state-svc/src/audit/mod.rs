//! The audit trail: every channel's audit stream (`ptt:{ch:<id>}:audit`, appended by the floor
//! scripts in the same atomic step as each change) and every sync session's
//! (`ptt:{sync:<id>}:audit`, appended by its compare-and-set) copied into PostgreSQL
//! (`floor_events`, `sync_events`), and the history queries of the admin API.
//!
//! - [`writer`]: the copy ([`AuditWriter`]), idempotent and without loss while PostgreSQL
//!   is down;
//! - [`migrations`]: the schema, migrated at start;
//! - [`history`]: talk and sync history for the admin API ([`History`]).

mod history;
mod migrations;
mod writer;

pub use history::{History, SyncRecord, TalkRecord};
pub use migrations::migrate;
pub use writer::{AUDIT_BACKLOG, AuditSettings, AuditWriter};
