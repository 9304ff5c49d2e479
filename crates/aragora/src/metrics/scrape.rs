//! Gauges that describe state rather than count events, set from the services
//! just before `/metrics` renders (a scrape is the only reader).

use crate::app::AppState;
use crate::encryption::migration::{MigrationStore, RunState};

/// Sets the scrape-time gauges from the services' current state.
pub fn refresh(state: &AppState) {
    let m = &state.metrics;
    let busiest = state
        .keyring
        .stats()
        .decrypts_per_actor
        .iter()
        .map(|a| a.last_minute)
        .max()
        .unwrap_or(0);
    m.secret_reads_busiest_actor
        .set(i64::try_from(busiest).unwrap_or(i64::MAX));
    if let Some(us) = state.keyring.primary_created_at_us() {
        m.primary_key_created.set(us.div_euclid(1_000_000));
    }
    let live = state
        .migration
        .live()
        .filter(|s| s.state == RunState::Running);
    for store in MigrationStore::ALL {
        let (running, processed) = match &live {
            Some(s) if s.store == store.name() => (1, s.processed()),
            _ => (0, 0),
        };
        m.migration_running
            .with_label_values(&[store.name()])
            .set(running);
        m.migration_processed
            .with_label_values(&[store.name()])
            .set(i64::try_from(processed).unwrap_or(i64::MAX));
    }
}
