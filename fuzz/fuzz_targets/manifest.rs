#![no_main]
//! See `fuzz_harness::TARGETS` for what `manifest` checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(body) = fuzz_harness::target("manifest") {
        body(data);
    }
});
