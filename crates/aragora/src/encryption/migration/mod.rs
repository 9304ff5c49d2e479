//! Re-encryption migration: rewraps every record of an encrypted store under
//! the current primary key, online and resumably.
//!
//! # Stores
//!
//! [`MigrationStore`] names a store (`--store=NAME`) and its collection; the
//! collection's owner registers an [`EncryptedCollection`](crate::encryption::EncryptedCollection) with the key ring at
//! boot (where a record's envelope is, how to put a new one in its place), so
//! this module never names a record type. Adding an encrypted store is adding
//! a variant and registering its collection.
//!
//! # Online, record by record compare-and-set
//!
//! Records are read a page at a time (`batch_size`, default 1000), decrypted
//! with exactly the key their header names, and re-encrypted under the primary
//! inside [`KeyRing::seal_many_and_write`](crate::encryption::KeyRing::seal_many_and_write) (the rotation gate, held shared, so
//! `cleanup_expired`'s usage scan never misses a record). Each rewritten record
//! expects the version it was read at: a concurrent API write wins, the
//! conflicting record is re-read (a fresh API write is already under the
//! primary) and the batch retried. No record is ever deleted or written with a
//! key that is not in the ring.
//!
//! # Resumable
//!
//! The progress ([`MigrationState`]: cursor = last record id done, counts,
//! failed and skipped records, timestamps) is the `Collection::Migrations` record
//! `migration:{store}`, written in the same atomic batch as the records it
//! describes, then waited durable. A killed run leaves state `running` with a
//! cursor; the next run continues after the cursor with the counts so far
//! (or starts over if the primary changed meanwhile).
//!
//! # Failures
//!
//! A record that does not decode or decrypt is listed in `failed_records`,
//! counted in `aragora_security_migration_errors_total{store}`, and the run
//! goes on. `--retry-failed` retries only those; `--skip-record=ID` marks one
//! skipped (listed, counted and audited; later runs leave it alone).
//!
//! # Sizes and faults
//!
//! The batch size comes from the configuration
//! (`ARAGORA_MIGRATION_BATCH_SIZE`); after each durable batch the run passes
//! the configuration's fault seam ([`FaultPoint::MigrationBatchDurable`](crate::config::FaultPoint::MigrationBatchDurable)),
//!
//! # Files
//!
//! `state.rs`: the stores, the persisted progress and the views of it;
//! `runner.rs`: [`Migrator`] (run, resume, retry, skip, dry run);
//! `error.rs`: [`MigrationError`].

mod error;
mod runner;
mod state;

pub use error::MigrationError;
pub use runner::{
    DEFAULT_BATCH_SIZE, MAX_LISTED_FAILURES, MigrationOptions, Migrator, register_metrics,
};
pub use state::{
    DryRunView, FailedRecord, KeyRecords, MigrationState, MigrationStore, MigrationView, RunState,
    UnreadableRecord,
};

#[cfg(test)]
mod tests;
