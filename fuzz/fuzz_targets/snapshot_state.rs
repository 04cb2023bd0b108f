#![no_main]
//! libFuzzer entry point; the harness and its input format are in `src/snapshot_state.rs`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = hearth_fuzz::snapshot_state::run(data);
});
