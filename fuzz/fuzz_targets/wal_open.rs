#![no_main]
//! See `fuzz_harness::TARGETS` for what `wal_open` checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(body) = fuzz_harness::target("wal_open") {
        body(data);
    }
});
