#![no_main]
//! libFuzzer entry point; the harness and its input format are in `src/api_request.rs`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = hearth_fuzz::api_request::run(data);
});
